"""`openr2 info`: the verified parameter counts and KV-cache sizes, on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from openr2.cli import main
from openr2.model.accounting import model_stats
from openr2.model.hf_io import save_model
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3


def _info_json(capsys, target):
    assert main(["info", target, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_deepseek_v3_counts(capsys):
    info = _info_json(capsys, "deepseek-v3")
    assert info["total_params"] == 671_026_404_352
    assert info["active_params"] / 1e9 == pytest.approx(36.6, abs=0.05)
    assert info["mtp_params"] == 11_610_067_968
    assert (info["kv_bytes_per_token_mla"], info["kv_bytes_per_token_mha"]) == (1152, 65536)
    assert round(info["kv_ratio"]) == 57


def test_deepseek_v2_lite_counts(capsys):
    info = _info_json(capsys, "deepseek-v2-lite")
    assert info["total_params"] == 15_706_484_224
    assert info["active_params"] / 1e9 == pytest.approx(2.45, abs=0.01)


def test_human_readable_output(capsys):
    assert main(["info", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671,026,404,352" in out and "56.9x smaller" in out


def test_checkpoint_directory_counts_its_real_parameters(tmp_path, capsys):
    model = build_model(tiny_v3())
    save_model(model, tmp_path)
    info = _info_json(capsys, str(tmp_path))
    main_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
    assert info["total_params"] == main_params == model_stats(tiny_v3()).total_params


def test_unknown_target_is_a_clear_error(capsys):
    assert main(["info", "no-such-model"]) == 2
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "openr2", "info", "tiny-v2", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["model_type"] == "deepseek_v2"


def test_init_demo_writes_a_servable_placeholder(tmp_path):
    from openr2 import LLM, SamplingParams

    assert main(["init-demo", str(tmp_path / "demo")]) == 0
    llm = LLM(tmp_path / "demo", num_blocks=32)
    out = llm.chat([{"role": "user", "content": "What is 2 + 2?"}], SamplingParams(max_tokens=4))[0]
    assert len(out.outputs[0].token_ids) >= 1 and out.prompt_token_ids[0] == llm.tokenizer.bos_token_id
