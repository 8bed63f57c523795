"""The command line: `openr2 info` (the verified parameter counts and KV-cache sizes, on the meta device),
`generate` and `chat` (checkpoint as MODEL or --model, the chat template by default, Ctrl-C and Ctrl-D),
the engine flags of generate, chat and serve (one per EngineConfig field, added only when those verbs are
parsed), `keys list`, `eval`'s default output path and `init-demo`."""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import importlib.util
import io
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from openr2.chat_format import encode_chat
from openr2.checkpoints import save_model
from openr2.cli import _add_engine_flags, _engine_config, build_parser, main, parse_size
from openr2.engine.engine import EngineConfig, LLMEngine
from openr2.eval.runner import EvalConfig
from openr2.model.accounting import model_stats
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from openr2.tokenizer import Tokenizer
from tests.checkpoints import save_tiny_chat_checkpoint


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


def test_deepseek_v32_counts_by_hand(capsys):
    """V3.2 = V3 + a lightning indexer per layer (the MTP layer's too); its key is cached beside the latent."""
    info = _info_json(capsys, "deepseek-v3.2")
    hidden, q_lora, heads, dim, layers = 7168, 1536, 64, 128, 61
    # wq_b [heads * dim, q_lora], wk [dim, hidden], k_norm weight and bias [dim], weights_proj [heads, hidden]
    per_layer = heads * dim * q_lora + dim * hidden + 2 * dim + heads * hidden
    assert per_layer == 12_582_912 + 917_504 + 256 + 458_752 == 13_959_424
    assert info["indexer_params"] == layers * per_layer == 851_524_864
    assert info["total_params"] == 671_026_404_352 + layers * per_layer  # V3's count plus the indexers
    assert info["active_params"] == 36_625_603_584 + layers * per_layer  # every token runs the whole indexer
    assert info["mtp_params"] == 11_610_067_968 + per_layer
    # bf16 per token and layer: latent 512 + rope key 64, indexer key 128; 61 layers
    assert (info["kv_bytes_per_token_mla"], info["index_bytes_per_token"]) == (1152, 256)
    assert info["cache_bytes_per_token"] == 61 * (1152 + 256) == 85_888
    assert _info_json(capsys, "deepseek-v3")["cache_bytes_per_token"] == 61 * 1152 == 70_272
    assert main(["info", "deepseek-v3.2"]) == 0
    out = capsys.readouterr().out
    assert "851,524,864" in out and "85,888 B" in out and "70,272 B for dense MLA (V3): +22.2%" in out
    assert "top-2048" in out


def test_deepseek_v4_counts_by_hand(capsys):
    """V4-Flash and -Pro land on their model cards (284B / 13B active; 1.6T / 49B active); the indexers and
    the cache sizes by hand from the config's numbers (bf16; the window counts once the context passes it)."""
    flash, pro = _info_json(capsys, "deepseek-v4-flash"), _info_json(capsys, "deepseek-v4-pro")
    assert flash["total_params"] / 1e9 == pytest.approx(284, abs=0.5)
    assert flash["active_params"] / 1e9 == pytest.approx(13, abs=0.5)
    assert pro["total_params"] / 1e12 == pytest.approx(1.6, abs=0.05)
    assert pro["active_params"] / 1e9 == pytest.approx(49, abs=0.5)
    hidden, heads, dim, q_lora, m = 4096, 64, 128, 1024, 4
    # indexer of a CSA layer: its compressor (kv and gate to 2 x dim, position bias [m, 2 dim], norm [dim]),
    # q_b_proj [heads * dim, q_lora], weights_proj [heads, hidden]
    per_layer = 2 * (2 * dim * hidden) + m * 2 * dim + dim + heads * dim * q_lora + heads * hidden
    assert flash["indexer_params"] == 21 * per_layer == 225_730_176
    # the MTP depth: a sliding-window block (attention: q_a, its norm, q_b, kv, its norm, o_a, o_b, sinks; MoE:
    # gate, 256 experts and the shared one of 3 x 4096 x 2048; two norms; two hyper-connections of 24 x 16384
    # + 24 + 3), plus enorm, hnorm, norm, e_proj, h_proj and its hc_head (4 x 16384 + 4 + 1)
    d, n = 4096, 4
    attn = d * q_lora + q_lora + q_lora * 64 * 512 + d * 512 + 512 + (64 * 512 // 8) * (8 * 1024) + 8 * 1024 * d + 64
    moe = 256 * d + 257 * 3 * d * 2048
    hc = 2 * ((2 + n) * n * n * d + (2 + n) * n + 3)
    assert flash["mtp_params"] == attn + moe + 2 * d + hc + 3 * d + 2 * d * d + n * n * d + n + 1
    # per token: a CSA layer's 512-dim entry and 128-dim key every 4 tokens, an HCA layer's entry every 128
    assert flash["cache_bytes_per_token"] == 21 * (512 + 128) * 2 // 4 + 20 * 512 * 2 // 128 == 6_880
    assert pro["cache_bytes_per_token"] == 30 * (512 + 128) * 2 // 4 + 31 * 512 * 2 // 128 == 9_848
    window = 43 * 128 * 512 * 2
    assert flash["cache_bytes"] == {str(n): window + n * 6_880 for n in (4096, 131072, 1048576)}
    assert flash["cache_bytes"]["1048576"] / 2**30 == pytest.approx(6.72, abs=0.005)  # vs V3: 68.6 GiB
    assert pro["cache_bytes"]["1048576"] / 2**30 == pytest.approx(9.62, abs=0.005)
    # float32 compressor state: CSA 2 x 2m x 2 x (512 + 128), HCA 2 x 128 x 512 elements per layer
    assert flash["compressor_state_bytes"] == 4 * (21 * 2 * 8 * 2 * 640 + 20 * 2 * 128 * 512)
    assert main(["info", "deepseek-v4-flash"]) == 0
    out = capsys.readouterr().out
    assert "2 sliding-window, 21 CSA 4:1, 20 HCA 128:1" in out and "6,880 B per token" in out
    assert "cache at 1M         6.72 GiB vs V3 MLA 68.62 GiB (past V3's 163,840 tokens): 9.8%" in out


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
    llm = LLM(tmp_path / "demo", compile=False, num_blocks=32)
    out = llm.chat([{"role": "user", "content": "What is 2 + 2?"}], SamplingParams(max_tokens=4))[0]
    assert len(out.outputs[0].token_ids) >= 1 and out.prompt_token_ids[0] == llm.tokenizer.bos_token_id


# ------------------------------------------------------------------------------------------------ generate, chat

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat")
    save_tiny_chat_checkpoint(path)
    return str(path)


@pytest.fixture
def prompts_seen(monkeypatch):
    """The prompt of every engine.stream call."""
    seen = []
    stream = LLMEngine.stream

    def spy(self, prompt, *args, **kwargs):
        seen.append(prompt)
        return stream(self, prompt, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "stream", spy)
    return seen


FAST = ["--max-tokens", "3", "--temperature", "0", "--no-compile"]


def test_checkpoint_as_model_flag_or_positional(ckpt, capsys, prompts_seen):
    assert main(["generate", "--model", ckpt, "--prompt", "hi", *FAST]) == 0  # as the model card writes it
    assert main(["generate", ckpt, "--prompt", "hi", *FAST]) == 0
    assert main(["generate", ckpt, "--model", ckpt + os.sep, "--prompt", "hi", *FAST]) == 0  # the same directory
    assert len(prompts_seen) == 3
    capsys.readouterr()
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        assert main(command) == 2
        assert capsys.readouterr().err == (f"openr2 {command[0]}: error: no checkpoint given: name its directory, "
                                           "as MODEL or --model MODEL\n")
        assert main([*command, ckpt, "--model", "elsewhere"]) == 2
        err = capsys.readouterr().err
        assert "two checkpoints given" in err and "elsewhere" in err and "Traceback" not in err


def test_generate_applies_the_chat_template_unless_raw(ckpt, tmp_path, capsys, prompts_seen):
    tokenizer = Tokenizer.from_pretrained(ckpt)
    assert main(["generate", ckpt, "--prompt", "What is 2+2?", *FAST]) == 0
    assert prompts_seen[-1] == {"prompt_token_ids": encode_chat([{"role": "user", "content": "What is 2+2?"}],
                                                                tokenizer)}
    assert main(["generate", ckpt, "--prompt", "What is 2+2?", "--raw", *FAST]) == 0
    assert prompts_seen[-1] == "What is 2+2?"
    # a tokenizer without a chat template (a base model): the plain text
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(ckpt):
        os.symlink(os.path.join(ckpt, name), bare / name)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").unlink()
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["generate", str(bare), "--prompt", "What is 2+2?", *FAST]) == 0
    assert prompts_seen[-1] == "What is 2+2?"


def test_chat_exits_cleanly_on_end_of_input(ckpt, monkeypatch, capsys, prompts_seen):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+2?\n/reset\n"))
    assert main(["chat", "--model", ckpt, *FAST]) == 0  # Ctrl-D
    out = capsys.readouterr()
    assert len(prompts_seen) == 1 and "(conversation cleared)" in out.out and "Traceback" not in out.err


@pytest.mark.parametrize("where", ["prompt", "reply"])
def test_chat_exits_130_on_ctrl_c(ckpt, monkeypatch, capsys, where):
    lines = iter(["What is 2+2?"])

    def read(prompt=""):
        if where == "reply":
            return next(lines)
        raise KeyboardInterrupt

    def interrupted(self, prompt, *args, **kwargs):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(builtins, "input", read)
    monkeypatch.setattr(LLMEngine, "stream", interrupted)
    assert main(["chat", ckpt, *FAST]) == 130
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_chat_process_exits_130_on_sigint(ckpt):
    """The real thing: SIGINT to `python -m openr2 chat` waiting at its prompt."""
    proc = subprocess.Popen([sys.executable, "-m", "openr2", "chat", "--model", ckpt, "--no-compile"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen, deadline = b"", time.monotonic() + 120
        while not seen.endswith(b">>> ") and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
        assert seen.endswith(b">>> "), seen
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err, err


# ------------------------------------------------------------------------------------------------ engine flags

def test_every_engine_config_field_is_a_flag_of_serve_generate_and_chat():
    given = {"block_size": ["--block-size", "32"], "kv_cache_bytes": ["--kv-cache-bytes", "512MiB"],
             "num_blocks": ["--num-blocks", "40"], "max_num_seqs": ["--max-num-seqs", "8"],
             "max_num_batched_tokens": ["--max-num-batched-tokens", "1024"],
             "max_model_len": ["--max-model-len", "2048"],
             "enable_prefix_caching": ["--no-enable-prefix-caching"], "compile": ["--compile"]}
    expected = EngineConfig(block_size=32, kv_cache_bytes=512 << 20, num_blocks=40, max_num_seqs=8,
                            max_num_batched_tokens=1024, max_model_len=2048, enable_prefix_caching=False,
                            compile=True)
    flags = [flag for name in given for flag in given[name]]
    for verb in (["serve", "--model", "m"], ["generate", "m", "--prompt", "hi"], ["chat", "m"]):
        assert _engine_config(build_parser().parse_args([*verb, *flags])) == expected
        assert _engine_config(build_parser().parse_args(verb)) == EngineConfig(compile=True)  # compiled by default
    args = build_parser().parse_args(["serve", "--model", "m", "--compile", "--no-compile"])
    assert _engine_config(args).compile is False  # the last one wins
    # and a field added later gets its flag with no new code
    values = {"bool": [], "int": ["2"], "float": ["0.5"], "str": ["x"]}
    for f in dataclasses.fields(EngineConfig):
        kind = f.type.split(" |")[0]  # engine.py's annotations are text (from __future__ import annotations)
        if kind in values:
            args = build_parser().parse_args(["serve", "--model", "m", "--" + f.name.replace("_", "-"), *values[kind]])
            assert hasattr(args, "engine_" + f.name), f.name


def test_engine_flags_skip_fields_they_cannot_type():
    """A dict or object field (a speculative config) takes a parser of its own: no flag, no error."""
    @dataclasses.dataclass
    class Config:
        max_things: int = 4
        ratio: float | None = None
        name: str = "x"
        drafts: dict | None = None
        sub: EngineConfig = dataclasses.field(default_factory=EngineConfig)

    parser = argparse.ArgumentParser()
    _add_engine_flags(parser, Config)
    args = parser.parse_args(["--max-things", "2", "--ratio", "0.5", "--name", "y"])
    assert vars(args) == {"engine_max_things": 2, "engine_ratio": 0.5, "engine_name": "y"}
    for absent in ("--drafts", "--sub"):
        with pytest.raises(SystemExit):
            parser.parse_args([absent, "1"])


def test_sizes_and_counts_are_checked_by_the_parser(capsys):
    assert [parse_size(t) for t in ("4096", "512MiB", "512M", "2GiB", "1.5G", "2GB", "64 kib")] == \
        [4096, 512 << 20, 512 << 20, 2 << 30, 3 << 29, 2 * 10**9, 64 << 10]
    for bad in (["--kv-cache-bytes", "12XB"], ["--kv-cache-bytes", "0"], ["--max-num-seqs", "0"],
                ["--block-size", "many"]):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["serve", "--model", "m", *bad])
        assert exit_.value.code == 2 and bad[0] in capsys.readouterr().err


def test_an_engine_flag_reaches_the_engine(ckpt, monkeypatch, capsys):
    configs = []
    stream = LLMEngine.stream

    def spy(self, *args, **kwargs):
        configs.append(self.config)
        return stream(self, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "stream", spy)
    assert main(["generate", ckpt, "--prompt", "hi", *FAST, "--num-blocks", "24", "--max-num-seqs", "3",
                 "--no-enable-prefix-caching"]) == 0
    assert configs == [EngineConfig(num_blocks=24, max_num_seqs=3, enable_prefix_caching=False)]


def test_help_stays_instant_the_engine_flags_load_with_their_verb():
    """Building the parser and parsing other verbs imports no torch; serve, generate and chat do (their flags
    come from EngineConfig)."""
    code = ("import sys; from openr2.cli import build_parser; p = build_parser(); p.parse_args(['keys', 'list']); "
            "print('torch' in sys.modules, end=' '); p.parse_args(['serve', '--model', 'm', '--max-num-seqs', '2']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_serve_runs_on_httptools_and_uvloop_with_its_startup_heap_frozen(ckpt, tmp_path, monkeypatch):
    """pyproject asks for uvicorn[standard]: where httptools and uvloop are installed, serve runs on them; what
    it loaded before listening is out of the cyclic GC's reach (gc.freeze)."""
    import gc

    import uvicorn

    configs, frozen = [], []

    def run(self):  # instead of listening
        configs.append(self.config)
        frozen.append(gc.get_freeze_count())

    monkeypatch.setattr(uvicorn.Server, "run", run)
    try:
        assert main(["serve", "--model", ckpt, "--data-dir", str(tmp_path), "--max-num-seqs", "2"]) == 3  # not started
    finally:
        gc.unfreeze()  # this is the test process, not a server's
    (config,) = configs
    assert frozen[0] > 0
    config.load()
    loop = config.get_loop_factory()() if hasattr(config, "get_loop_factory") else None
    try:
        if importlib.util.find_spec("httptools"):
            assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
        if importlib.util.find_spec("uvloop") and loop is not None:
            assert type(loop).__module__.startswith("uvloop")
    finally:
        if loop is not None:
            loop.close()


# ------------------------------------------------------------------------------------------------ keys, eval

def test_keys_list_says_when_there_are_none(tmp_path, capsys):
    assert main(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "no keys\n"
    assert main(["keys", "create", "laptop", "--data-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "laptop"


def test_keys_with_a_prepaid_balance_and_topup(tmp_path, capsys):
    data = ["--data-dir", str(tmp_path)]
    assert main(["keys", "create", "prepaid", "--balance", "5.00", *data]) == 0
    key_id = capsys.readouterr().out.split()[0]
    assert main(["keys", "topup", key_id, "0.25", *data]) == 0
    assert capsys.readouterr().out.strip() == f"{key_id}: balance $5.25"
    assert main(["keys", "list", *data]) == 0
    assert json.loads(capsys.readouterr().out)["balance_usd"] == "$5.25"
    for bad, says in ((["keys", "topup", key_id, "-1"], "non-negative"), (["keys", "topup", key_id, "0"], "more than"),
                      (["keys", "topup", "key_nope", "1"], "no key"), (["keys", "topup", key_id], "usage"),
                      (["keys", "list", "--balance", "1"], "--balance goes with"),
                      (["keys", "create", "x", "--balance", "lots"], "not a number")):
        assert main([*bad, *data]) == 2
        assert says in capsys.readouterr().err


def test_eval_writes_under_runs_eval_by_default(ckpt, tmp_path, monkeypatch, capsys):
    assert EvalConfig(task="synthetic:addition:1", model="x/ckpt/").out_path() == \
        os.path.join("runs", "eval", "eval-synthetic-addition-1-ckpt.json")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--task", "synthetic:addition:1", "--model", ckpt, "--limit", "1", "--max-tokens", "2",
                 "--no-progress"]) == 0
    name = f"eval-synthetic-addition-1-{os.path.basename(ckpt)}"
    assert sorted(os.listdir(tmp_path / "runs" / "eval")) == [name + ".json", name + ".md"]
    assert capsys.readouterr().err.strip().endswith(os.path.join("runs", "eval", name + ".json"))


def test_speculative_flag(ckpt, capsys, prompts_seen):
    assert main(["generate", ckpt, "--prompt", "hi", "--speculative", "ngram:2", *FAST]) == 0
    capsys.readouterr()
    assert main(["generate", ckpt, "--prompt", "hi", "--speculative", "mtp2", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--speculative: expected METHOD:K" in err and "Traceback" not in err


def test_serve_chat_and_generate_compile_by_default():
    from openr2.cli import _engine_config, build_parser

    for argv in (["serve", "--model", "m"], ["chat", "m"], ["generate", "m", "--prompt", "x"]):
        assert _engine_config(build_parser().parse_args(argv)).compile is True
        assert _engine_config(build_parser().parse_args([*argv, "--no-compile"])).compile is False
        config = _engine_config(build_parser().parse_args([*argv, "--speculative", "mtp:2"]))
        assert config.speculative_config == "mtp:2"
