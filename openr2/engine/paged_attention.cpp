// Absorbed-MLA attention read in place from the paged latent pool (CPU, float32): the kernel behind
// openr2/engine/paged_attention.py, which explains the design and holds the reference it is tested against.
// Also DeepSeek-V3.2's lightning-indexer scan over the paged indexer keys (openr2::paged_index_scores, below).
//
// openr2::paged_latent_attention(q_latent [B, T, H, C], q_rope [B, T, H, R], pool_c [L, N, C], pool_r [L, N, R],
//                                layer, block_table [B, W], positions [B, T], block_size, scale) -> [B, T, H, C]
//
// Query (b, t, h) attends over keys 0..positions[b, t] of row b: key k lives in pool slot
// block_table[b, k / block_size] * block_size + k % block_size of layer `layer`. Key = [c_kv, k_rope], value = c_kv.
// out = softmax(scale * (q_latent . c_kv + q_rope . k_rope)) @ c_kv, with the softmax in float32.
//
// Work: each row's blocks are cut into chunks of kChunkTokens; one (row, chunk) is one task of at::parallel_for
// (flash-decoding: a long single row still uses every thread). A task walks its blocks in place in groups of
// about kGroupTokens keys, keeping an online softmax (running max m, sum l, unnormalised output acc) per query,
// updated once per group; the chunks of a row are then combined by log-sum-exp. The split depends on the lengths only, never on the thread count, so results do
// not change with the number of threads.
//
// Layout inside a task: the T*H query rows of a row are the vector lanes ("Q lanes", Qp = Q rounded up to the
// vector width). Scores of one key for all queries are one vector FMA per key dimension (a broadcast of the
// key element times the transposed queries), so the keys are read as they lie in the pool (row-major, no
// transpose, no horizontal sums) and the softmax runs lane-wise. The value product runs the other way round:
// acc[i, :] += p[i, j] * c_kv[j, :], register-blocked over 4 queries x 4 vectors of C.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kChunkTokens = 1024;  // keys per task (at least one group)
constexpr int64_t kGroupTokens = 64;    // keys per softmax update (at least one block)
constexpr int64_t kPartialBytes = 64 << 20;  // bound on the chunks' partial outputs (long rows of many queries)

// st[u][0:Qp] (+)= sum_d k[u][d] * qt[d][0:Qp] for KB keys u (rows of k, ldk apart) and D dimensions.
template <int KB>
inline void scores_block(const float* k, int64_t ldk, const float* qt, int64_t D, int64_t QV, float* st,
                         int64_t Qp, bool add) {
  for (int64_t v = 0; v < QV; ++v) {
    Vec acc[KB];
    for (int u = 0; u < KB; ++u) acc[u] = add ? Vec::loadu(st + u * Qp + v * kLanes) : Vec(0.f);
    for (int64_t d = 0; d < D; ++d) {
      const Vec q = Vec::loadu(qt + d * Qp + v * kLanes);
      for (int u = 0; u < KB; ++u) acc[u] = at::vec::fmadd(Vec(k[u * ldk + d]), q, acc[u]);
    }
    for (int u = 0; u < KB; ++u) acc[u].store(st + u * Qp + v * kLanes);
  }
}

inline void scores(const float* k, int64_t ldk, int64_t nk, const float* qt, int64_t D, int64_t QV, float* st,
                   int64_t Qp, bool add) {
  int64_t j = 0;
  for (; j + 8 <= nk; j += 8) scores_block<8>(k + j * ldk, ldk, qt, D, QV, st + j * Qp, Qp, add);
  for (; j < nk; ++j) scores_block<1>(k + j * ldk, ldk, qt, D, QV, st + j * Qp, Qp, add);
}

// acc[i0 + qi][c0 : c0 + CB * lanes] += sum_j pt[j][i0 + qi] * v[j][...] for QB queries.
template <int QB, int CB>
inline void values_block(const float* pt, int64_t Qp, int64_t i0, const float* v, int64_t C, int64_t c0,
                         int64_t nk, float* acc) {
  Vec a[QB][CB];
  for (int qi = 0; qi < QB; ++qi)
    for (int cb = 0; cb < CB; ++cb) a[qi][cb] = Vec::loadu(acc + (i0 + qi) * C + c0 + cb * kLanes);
  for (int64_t j = 0; j < nk; ++j) {
    Vec x[CB];
    for (int cb = 0; cb < CB; ++cb) x[cb] = Vec::loadu(v + j * C + c0 + cb * kLanes);
    for (int qi = 0; qi < QB; ++qi) {
      const Vec p(pt[j * Qp + i0 + qi]);
      for (int cb = 0; cb < CB; ++cb) a[qi][cb] = at::vec::fmadd(p, x[cb], a[qi][cb]);
    }
  }
  for (int qi = 0; qi < QB; ++qi)
    for (int cb = 0; cb < CB; ++cb) a[qi][cb].store(acc + (i0 + qi) * C + c0 + cb * kLanes);
}

template <int QB>
inline void values_rows(const float* pt, int64_t Qp, int64_t i0, const float* v, int64_t C, int64_t nk,
                        float* acc) {
  int64_t c0 = 0;
  for (; c0 + 4 * kLanes <= C; c0 += 4 * kLanes) values_block<QB, 4>(pt, Qp, i0, v, C, c0, nk, acc);
  for (; c0 + kLanes <= C; c0 += kLanes) values_block<QB, 1>(pt, Qp, i0, v, C, c0, nk, acc);
  for (; c0 < C; ++c0)  // C not a multiple of the vector width
    for (int qi = 0; qi < QB; ++qi) {
      float s = acc[(i0 + qi) * C + c0];
      for (int64_t j = 0; j < nk; ++j) s += pt[j * Qp + i0 + qi] * v[j * C + c0];
      acc[(i0 + qi) * C + c0] = s;
    }
}

inline void values(const float* pt, int64_t Q, int64_t Qp, const float* v, int64_t C, int64_t nk, float* acc) {
  int64_t i = 0;
  for (; i + 4 <= Q; i += 4) values_rows<4>(pt, Qp, i, v, C, nk, acc);
  for (; i < Q; ++i) values_rows<1>(pt, Qp, i, v, C, nk, acc);
}

struct Problem {
  const float *q, *qr, *pool_c, *pool_r;
  const int64_t *table, *pos;
  float* out;
  int64_t B, T, H, C, R, W, block_size, num_blocks;
  float scale;
};

void attend(const Problem& p) {
  const int64_t B = p.B, T = p.T, H = p.H, C = p.C, R = p.R, W = p.W, bs = p.block_size;
  const int64_t Q = T * H, QV = (Q + kLanes - 1) / kLanes, Qp = QV * kLanes;
  const int64_t group_blocks = std::max<int64_t>(1, kGroupTokens / bs);
  // tasks: (row, chunk); a row reads keys 0..max_t positions[b, t]
  std::vector<int64_t> task_row, task_chunk, row_first(B + 1), row_keys(B), row_min(B);
  int64_t total_groups = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t last = p.pos[b * T];
    for (int64_t t = 0; t < T; ++t) last = std::max(last, p.pos[b * T + t]);
    total_groups += (last + group_blocks * bs) / (group_blocks * bs);
  }
  // chunks of kChunkTokens keys, longer where many queries would make the partial outputs (tasks x Q x C)
  // outgrow kPartialBytes; a function of the shapes only, never of the thread count
  const int64_t max_tasks = std::max<int64_t>(B, kPartialBytes / (Q * C * static_cast<int64_t>(sizeof(float))));
  const int64_t chunk_groups = std::max<int64_t>(std::max<int64_t>(1, kChunkTokens / (group_blocks * bs)),
                                                 (total_groups + max_tasks - 1) / max_tasks);
  const int64_t chunk_blocks = chunk_groups * group_blocks;
  for (int64_t b = 0; b < B; ++b) {
    int64_t last = p.pos[b * T], first = p.pos[b * T];
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(p.pos[b * T + t] >= 0, "positions must be >= 0");
      last = std::max(last, p.pos[b * T + t]);
      first = std::min(first, p.pos[b * T + t]);
    }
    row_keys[b] = last + 1;
    row_min[b] = first;
    const int64_t nblk = (row_keys[b] + bs - 1) / bs;
    TORCH_CHECK(nblk <= W, "row ", b, " reads ", nblk, " blocks; its block table holds ", W);
    for (int64_t i = 0; i < nblk; ++i)
      TORCH_CHECK(p.table[b * W + i] >= 0 && p.table[b * W + i] < p.num_blocks, "block table entry ",
                  p.table[b * W + i], " (row ", b, ") outside the pool's ", p.num_blocks, " blocks");
    row_first[b] = static_cast<int64_t>(task_row.size());
    for (int64_t c = 0; c * chunk_blocks < nblk; ++c) task_row.push_back(b), task_chunk.push_back(c);
  }
  row_first[B] = static_cast<int64_t>(task_row.size());
  const int64_t tasks = row_first[B];

  // per row: the scaled queries transposed to lanes, qt [C + R][Qp], and each lane's last visible key
  std::vector<float> qt(B * (C + R) * Qp, 0.f), lim(B * Qp, -1.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < Q; ++i) {
      float* t = qt.data() + b * (C + R) * Qp + i;
      for (int64_t d = 0; d < C; ++d) t[d * Qp] = p.q[(b * Q + i) * C + d] * p.scale;
      for (int64_t d = 0; d < R; ++d) t[(C + d) * Qp] = p.qr[(b * Q + i) * R + d] * p.scale;
      lim[b * Qp + i] = static_cast<float>(p.pos[b * T + i / H]);
    }

  std::vector<float> part_acc(tasks * Q * C), part_m(tasks * Qp), part_l(tasks * Qp);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> st(group_blocks * bs * Qp), alpha(Qp), group_acc(Q * C);
    std::vector<Vec> m(QV), l(QV);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task_row[task];
      const float* qtb = qt.data() + b * (C + R) * Qp;
      const float* limb = lim.data() + b * Qp;
      float* acc = part_acc.data() + task * Q * C;
      std::fill(acc, acc + Q * C, 0.f);
      std::fill(m.begin(), m.end(), Vec(kNegInf));
      std::fill(l.begin(), l.end(), Vec(0.f));
      const int64_t nblk = (row_keys[b] + bs - 1) / bs;
      const int64_t blk_end = std::min(nblk, (task_chunk[task] + 1) * chunk_blocks);
      for (int64_t g = task_chunk[task] * chunk_blocks; g < blk_end; g += group_blocks) {
        // a group: consecutive keys k_first.. over whole blocks, one softmax update for all of them
        const int64_t g_end = std::min(blk_end, g + group_blocks), k_first = g * bs;
        int64_t n = 0;
        for (int64_t blk = g; blk < g_end; ++blk) {
          const int64_t nk = std::min(bs, row_keys[b] - blk * bs), slot = p.table[b * W + blk] * bs;
          scores(p.pool_c + slot * C, C, nk, qtb, C, QV, st.data() + n * Qp, Qp, false);
          scores(p.pool_r + slot * R, R, nk, qtb + C * Qp, R, QV, st.data() + n * Qp, Qp, true);
          n += nk;
        }
        const bool masked = k_first + n - 1 > row_min[b];  // some query of the row sees only part of the group
        for (int64_t v = 0; v < QV; ++v) {
          float* sv = st.data() + v * kLanes;
          const Vec lv = Vec::loadu(limb + v * kLanes);
          Vec group_max(kNegInf);
          for (int64_t j = 0; j < n; ++j) {
            Vec s = Vec::loadu(sv + j * Qp);
            if (masked) {
              s = Vec::blendv(s, Vec(kNegInf), Vec(static_cast<float>(k_first + j)) > lv);
              s.store(sv + j * Qp);
            }
            group_max = at::vec::maximum(group_max, s);
          }
          const Vec new_max = at::vec::maximum(m[v], group_max);
          // a lane that has seen no key yet keeps max -inf: shift by 0 there (exp(-inf) = 0, never NaN)
          const Vec shift = Vec::blendv(new_max, Vec(0.f), new_max == Vec(kNegInf));
          const Vec a = (m[v] - shift).exp();
          Vec sum(0.f);
          for (int64_t j = 0; j < n; ++j) {
            const Vec e = (Vec::loadu(sv + j * Qp) - shift).exp();
            e.store(sv + j * Qp);
            sum = sum + e;
          }
          l[v] = l[v] * a + sum;
          m[v] = new_max;
          a.store(alpha.data() + v * kLanes);
        }
        // the group's values summed on their own, then added: two short sums, not one of a whole chunk
        std::fill(group_acc.begin(), group_acc.end(), 0.f);
        n = 0;
        for (int64_t blk = g; blk < g_end; ++blk) {
          const int64_t nk = std::min(bs, row_keys[b] - blk * bs), slot = p.table[b * W + blk] * bs;
          values(st.data() + n * Qp, Q, Qp, p.pool_c + slot * C, C, nk, group_acc.data());
          n += nk;
        }
        for (int64_t i = 0; i < Q; ++i) {
          float* ai = acc + i * C;
          const float* gi = group_acc.data() + i * C;
          const Vec ax(alpha[i]);
          int64_t c = 0;
          for (; c + kLanes <= C; c += kLanes) at::vec::fmadd(ax, Vec::loadu(ai + c), Vec::loadu(gi + c)).store(ai + c);
          for (; c < C; ++c) ai[c] = alpha[i] * ai[c] + gi[c];
        }
      }
      for (int64_t v = 0; v < QV; ++v) {
        m[v].store(part_m.data() + task * Qp + v * kLanes);
        l[v].store(part_l.data() + task * Qp + v * kLanes);
      }
    }
  });

  // the chunks of a row, combined by log-sum-exp
  at::parallel_for(0, B * Q, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / Q, i = bq % Q;
      float M = kNegInf;
      for (int64_t task = row_first[b]; task < row_first[b + 1]; ++task) M = std::max(M, part_m[task * Qp + i]);
      float total = 0.f;
      float* o = p.out + bq * C;
      std::fill(o, o + C, 0.f);
      for (int64_t task = row_first[b]; task < row_first[b + 1]; ++task) {
        const float mi = part_m[task * Qp + i];
        if (mi == kNegInf) continue;  // this chunk lies wholly past the query
        const float w = std::exp(mi - M);
        total += w * part_l[task * Qp + i];
        const float* a = part_acc.data() + (task * Q + i) * C;
        for (int64_t c = 0; c < C; ++c) o[c] += w * a[c];
      }
      for (int64_t c = 0; c < C; ++c) o[c] /= total;
    }
  });
}

// ---------------------------------------------------------------------------------------------- indexer scan
// I[b, t, j] = sum_h w[b, t, h] ReLU(scale q[b, t, h] . k[j]) for key j of row b's context, read in place.
// float32 pool: the heads are the vector lanes: per key, D broadcast-FMAs give its H products, and ReLU, the
// head weight and the sum over heads fold into one more FMA per vector and one horizontal sum per key: the
// [H, S] products are never stored. (scale > 0 moves out of the ReLU onto the weights.)
// bfloat16 pool (opt-in, as DeepSeek's kernels score in low precision): the queries are rounded to bfloat16 too
// and the products of 16 keys x 16 heads are one AMX tile (bf16 pairs multiplied exactly, summed in float32),
// then ReLU, head weight and head sum in AVX-512 as above; without AMX (or for D not a multiple of 32, blocks not
// of 16 keys) each block's keys are widened to float32 and scored by the float32 code.
constexpr int64_t kIndexChunkTokens = 2048;  // keys per task

template <int KB>
inline void index_block(const float* k, int64_t D, const float* qt, const float* w, int64_t HV, int64_t Hp,
                        float* out) {
  Vec tot[KB];
  for (int u = 0; u < KB; ++u) tot[u] = Vec(0.f);
  for (int64_t v = 0; v < HV; ++v) {
    Vec acc[KB];
    for (int u = 0; u < KB; ++u) acc[u] = Vec(0.f);
    for (int64_t d = 0; d < D; ++d) {
      const Vec q = Vec::loadu(qt + d * Hp + v * kLanes);
      for (int u = 0; u < KB; ++u) acc[u] = at::vec::fmadd(Vec(k[u * D + d]), q, acc[u]);
    }
    const Vec wv = Vec::loadu(w + v * kLanes);
    for (int u = 0; u < KB; ++u) tot[u] = at::vec::fmadd(at::vec::maximum(acc[u], Vec(0.f)), wv, tot[u]);
  }
  for (int u = 0; u < KB; ++u)
    out[u] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, tot[u]);
}

// The same for exactly HV vectors of heads (HV * lanes = 64 heads, the release's, on AVX-512): all heads' sums
// of KB keys in registers at once, so each step over d loads HV query vectors and KB key scalars for HV * KB
// FMAs (the generic form above loads one query vector per KB FMAs, and its scalar broadcasts bound it).
template <int HV, int KB>
inline void index_block_heads(const float* k, int64_t D, const float* qt, const float* w, float* out) {
  Vec acc[KB][HV];
  for (int u = 0; u < KB; ++u)
    for (int v = 0; v < HV; ++v) acc[u][v] = Vec(0.f);
  for (int64_t d = 0; d < D; ++d) {
    Vec q[HV];
    for (int v = 0; v < HV; ++v) q[v] = Vec::loadu(qt + d * HV * kLanes + v * kLanes);
    for (int u = 0; u < KB; ++u) {
      const Vec kd(k[u * D + d]);
      for (int v = 0; v < HV; ++v) acc[u][v] = at::vec::fmadd(kd, q[v], acc[u][v]);
    }
  }
  for (int u = 0; u < KB; ++u) {
    Vec tot(0.f);
    for (int v = 0; v < HV; ++v)
      tot = at::vec::fmadd(at::vec::maximum(acc[u][v], Vec(0.f)), Vec::loadu(w + v * kLanes), tot);
    out[u] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, tot);
  }
}

// scores of keys k[0..n) (rows D apart) for one query: qt [D][HV lanes], w [HV lanes]
inline void index_keys(const float* k, int64_t n, int64_t D, const float* qt, const float* w, int64_t HV,
                       float* out) {
  int64_t j = 0;
  if (HV * kLanes == 64 && kLanes == 16) {
    for (; j + 6 <= n; j += 6) index_block_heads<4, 6>(k + j * D, D, qt, w, out + j);
    for (; j < n; ++j) index_block_heads<4, 1>(k + j * D, D, qt, w, out + j);
    return;
  }
  const int64_t Hp = HV * kLanes;
  for (; j + 8 <= n; j += 8) index_block<8>(k + j * D, D, qt, w, HV, Hp, out + j);
  for (; j < n; ++j) index_block<1>(k + j * D, D, qt, w, HV, Hp, out + j);
}

// ReLU, head weight and head sum of the products c [n][Hp] (row-major) -> out[0..n)
inline void weigh_heads(const float* c, int64_t n, const float* w, int64_t HV, float* out) {
  const int64_t Hp = HV * kLanes;
  for (int64_t u = 0; u < n; ++u) {
    Vec tot(0.f);
    for (int64_t v = 0; v < HV; ++v)
      tot = at::vec::fmadd(at::vec::maximum(Vec::loadu(c + u * Hp + v * kLanes), Vec(0.f)),
                           Vec::loadu(w + v * kLanes), tot);
    out[u] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, tot);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OPENR2_AMX 1
// AMX: CPUID leaf 7 (EDX bits 22 AMX-BF16, 24 AMX-TILE) and the kernel's permission for the tile state
// (Linux: arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, once per process; granted or refused).
bool amx_usable() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: products of 16 keys x 16 heads (float32); 4: 16 keys x 32 dims (bf16); 5-7: 16 pairs of dims x
// 16 heads (bf16, pair-interleaved). Each thread configures its own tiles.
__attribute__((target("amx-tile"))) void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  asm volatile("" : : "r"(&cfg) : "memory");  // GCC 12 drops these stores otherwise (ldtilecfg's read unseen)
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// c [16][Hp] = the products of 16 keys (k: rows D bf16 apart) with a query's heads, HG = Hp / 16 groups of
// 16; qv holds the query pair-interleaved per (32 dims, head group): qv[((s * HG + g) * 16 + r) * 32 + 2 h + i]
// = q[16 g + h][32 s + 2 r + i] (AMX's B layout), so tile C[u][h] += sum_{r, i} k[u][32 s + 2 r + i] * that.
__attribute__((target("amx-tile,amx-bf16"))) void amx_products16(const uint16_t* k, int64_t D,
                                                                  const uint16_t* qv, int64_t HG, float* c) {
  const int64_t ldc = HG * 16 * sizeof(float);
  for (int64_t g0 = 0; g0 < HG; g0 += 4) {
    const int64_t ng = std::min<int64_t>(4, HG - g0);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < D / 32; ++s) {
      _tile_loadd(4, k + s * 32, D * 2);
      const uint16_t* b = qv + (s * HG + g0) * 512;
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (ng > 1) {
        _tile_loadd(6, b + 512, 64);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (ng > 2) {
        _tile_loadd(7, b + 1024, 64);
        _tile_dpbf16ps(2, 4, 7);
      }
      if (ng > 3) {
        _tile_loadd(5, b + 1536, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    float* cg = c + g0 * 16;
    _tile_stored(0, cg, ldc);
    if (ng > 1) _tile_stored(1, cg + 16, ldc);
    if (ng > 2) _tile_stored(2, cg + 32, ldc);
    if (ng > 3) _tile_stored(3, cg + 48, ldc);
  }
}
#endif

struct IndexProblem {
  const float *q, *w;  // q: float32 (bf16 pools: the queries rounded to bf16, widened back)
  const void* pool;     // float32 or bfloat16 [N, D], one layer
  const int64_t *table, *pos;
  float* out;
  int64_t B, T, H, D, W, S, block_size, num_blocks;
  float scale;
  bool bf16, amx;
};

// One thread's scorer of one block's keys for the queries of its row: the float32 code over float32 keys (in
// place, or widened from bf16 into a buffer once per block), or AMX over bf16 keys in place.
class BlockScorer {
 public:
  BlockScorer(const IndexProblem& p, const float* qt, const float* wt, const uint16_t* qv)
      : p_(p), qt_(qt), wt_(wt), qv_(qv), HV_((p.H + kLanes - 1) / kLanes) {
    if (p.bf16 && !p.amx) wide_.resize(p.block_size * p.D);
    if (p.amx) c_.resize(16 * HV_ * kLanes);
#ifdef OPENR2_AMX
    if (p.amx) amx_configure();
#endif
  }
  ~BlockScorer() {
#ifdef OPENR2_AMX
    if (p_.amx) amx_release();
#endif
  }
  void block(int64_t slot0) {  // the block whose first pool slot is slot0
    if (!p_.bf16) {
      keys_ = static_cast<const float*>(p_.pool) + slot0 * p_.D;
    } else if (!p_.amx) {
      const auto* src = static_cast<const at::BFloat16*>(p_.pool) + slot0 * p_.D;
      for (int64_t i = 0; i < p_.block_size * p_.D; ++i) wide_[i] = static_cast<float>(src[i]);
      keys_ = wide_.data();
    } else {
      keys16_ = static_cast<const uint16_t*>(p_.pool) + slot0 * p_.D;
    }
  }
  void keys(int64_t n, int64_t bt, float* o) {  // the first n keys of the block for query bt
    const int64_t D = p_.D, Hp = HV_ * kLanes;
    if (!p_.amx) return index_keys(keys_, n, D, qt_ + bt * D * Hp, wt_ + bt * Hp, HV_, o);
#ifdef OPENR2_AMX
    for (int64_t j = 0; j < n; j += 16) {  // whole tiles of 16 keys (blocks are whole tiles): extra rows unused
      amx_products16(keys16_ + j * D, D, qv_ + bt * D * Hp, Hp / 16, c_.data());
      weigh_heads(c_.data(), std::min<int64_t>(16, n - j), wt_ + bt * Hp, HV_, o + j);
    }
#endif
  }

 private:
  const IndexProblem& p_;
  const float *qt_, *wt_;
  const uint16_t* qv_;
  const int64_t HV_;
  const float* keys_ = nullptr;
  const uint16_t* keys16_ = nullptr;
  std::vector<float> wide_, c_;
};

void index_scan(const IndexProblem& p) {
  const int64_t B = p.B, T = p.T, H = p.H, D = p.D, W = p.W, S = p.S, bs = p.block_size;
  const int64_t HV = (H + kLanes - 1) / kLanes, Hp = HV * kLanes;
  std::vector<int64_t> task_row, task_first, row_keys(B);
  const int64_t chunk_blocks = std::max<int64_t>(1, kIndexChunkTokens / bs);
  for (int64_t b = 0; b < B; ++b) {
    int64_t last = p.pos[b * T];
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(p.pos[b * T + t] >= 0, "positions must be >= 0");
      last = std::max(last, p.pos[b * T + t]);
    }
    TORCH_CHECK(last < S, "row ", b, " has a query at position ", last, " past the ", S, " keys scored");
    row_keys[b] = last + 1;
    const int64_t nblk = (row_keys[b] + bs - 1) / bs;
    TORCH_CHECK(nblk <= W, "row ", b, " reads ", nblk, " blocks; its block table holds ", W);
    for (int64_t i = 0; i < nblk; ++i)
      TORCH_CHECK(p.table[b * W + i] >= 0 && p.table[b * W + i] < p.num_blocks, "block table entry ",
                  p.table[b * W + i], " (row ", b, ") outside the pool's ", p.num_blocks, " blocks");
    for (int64_t c = 0; c < nblk; c += chunk_blocks) task_row.push_back(b), task_first.push_back(c);
  }
  // per query: its heads transposed to lanes, qt [D][Hp], and the weights times the scale (padding lanes 0);
  // for AMX the heads pair-interleaved per 32 dims and 16 heads instead (amx_products16)
  std::vector<float> qt(p.amx ? 0 : B * T * D * Hp, 0.f), wt(B * T * Hp, 0.f);
  std::vector<uint16_t> qv(p.amx ? B * T * D * Hp : 0, 0);
  for (int64_t bt = 0; bt < B * T; ++bt)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < D; ++d) {
        const float x = p.q[(bt * H + h) * D + d];
        if (!p.amx) {
          qt[(bt * D + d) * Hp + h] = x;
        } else {  // x is a bf16 value widened: its bits are the top half of the float's
          const int64_t s = d / 32, r = (d % 32) / 2, i = d % 2, g = h / 16;
          qv[bt * D * Hp + ((s * (Hp / 16) + g) * 16 + r) * 32 + 2 * (h % 16) + i] = c10::bit_cast<uint32_t>(x) >> 16;
        }
      }
      wt[bt * Hp + h] = p.w[bt * H + h] * p.scale;
    }
  // keys past each query's position (and past its row's context): -inf, as the reference masks them
  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt)
      std::fill(p.out + bt * S + p.pos[bt] + 1, p.out + (bt + 1) * S, kNegInf);
  });
  // Tasks are claimed one at a time from a shared counter, not split evenly up front: on a shared machine a
  // thread whose CPU is taken by another process then does fewer tasks instead of holding up the step. Each
  // score is computed by one task whichever thread runs it, so the numbers do not depend on the schedule.
  const int64_t tasks = static_cast<int64_t>(task_row.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), tasks), 1, [&](int64_t, int64_t) {
    BlockScorer scorer(p, qt.data(), wt.data(), qv.data());
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t b = task_row[task];
      const int64_t nblk = (row_keys[b] + bs - 1) / bs;
      for (int64_t blk = task_first[task]; blk < std::min(nblk, task_first[task] + chunk_blocks); ++blk) {
        const int64_t j0 = blk * bs;
        scorer.block(p.table[b * W + blk] * bs);
        for (int64_t t = 0; t < T; ++t) {  // the block stays in L1/L2 for every query of the row
          const int64_t bt = b * T + t;
          const int64_t n = std::min(bs, p.pos[bt] + 1 - j0);  // keys of this block the query sees
          if (n > 0) scorer.keys(n, bt, p.out + bt * S + j0);
        }
      }
    }
  });
}

bool index_amx_usable(int64_t D, int64_t block_size) {
#ifdef OPENR2_AMX
  return kLanes == 16 && D % 32 == 0 && block_size % 16 == 0 && amx_usable();
#else
  return false;
#endif
}

at::Tensor paged_index_scores(const at::Tensor& q_index, const at::Tensor& weights, const at::Tensor& pool_k,
                              int64_t layer, const at::Tensor& block_table, const at::Tensor& positions,
                              int64_t num_keys, int64_t block_size, double scale) {
  TORCH_CHECK(q_index.dim() == 4 && weights.dim() == 3, "q_index [B, T, H, D] and weights [B, T, H]");
  const bool bf16 = pool_k.scalar_type() == at::kBFloat16;
  TORCH_CHECK(pool_k.dim() == 3 && (pool_k.scalar_type() == at::kFloat || bf16) && pool_k.is_contiguous(),
              "pool_k: a contiguous float32 or bfloat16 [L, N, D]");
  const int64_t B = q_index.size(0), T = q_index.size(1), H = q_index.size(2), D = q_index.size(3);
  TORCH_CHECK(weights.size(0) == B && weights.size(1) == T && weights.size(2) == H, "weights shape");
  TORCH_CHECK(pool_k.size(2) == D, "pool_k width ", pool_k.size(2), " != the queries' ", D);
  TORCH_CHECK(layer >= 0 && layer < pool_k.size(0), "layer ", layer, " outside the pool's ", pool_k.size(0));
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B, "block_table [B, W]");
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T, "positions [B, T]");
  TORCH_CHECK(block_size > 0 && pool_k.size(1) % block_size == 0, "pool slots must be whole blocks");
  TORCH_CHECK(scale > 0, "scale must be > 0 (it moves out of the ReLU)");
  // a bf16 pool scores bf16 queries: rounded here, then widened (exactly) for the float32 code's layout
  const auto q = (bf16 ? q_index.to(at::kBFloat16) : q_index).to(at::kFloat).contiguous();
  const auto w = weights.to(at::kFloat).contiguous();
  const auto table = block_table.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  auto out = at::empty({B, T, num_keys}, q.options());
  if (B * T == 0 || num_keys == 0) return out;
  IndexProblem p{q.data_ptr<float>(), w.data_ptr<float>(), pool_k.select(0, layer).data_ptr(),
                 table.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), out.data_ptr<float>(), B, T, H, D,
                 table.size(1), num_keys, block_size, pool_k.size(1) / block_size, static_cast<float>(scale),
                 bf16, bf16 && index_amx_usable(D, block_size)};
  index_scan(p);
  return out;
}

// Whether a bf16 indexer pool of key width D and this block size is scored with AMX here (else widened).
bool paged_index_amx(int64_t D, int64_t block_size) { return index_amx_usable(D, block_size); }

at::Tensor paged_latent_attention(const at::Tensor& q_latent, const at::Tensor& q_rope, const at::Tensor& pool_c,
                                  const at::Tensor& pool_r, int64_t layer, const at::Tensor& block_table,
                                  const at::Tensor& positions, int64_t block_size, double scale) {
  TORCH_CHECK(q_latent.dim() == 4 && q_rope.dim() == 4, "q_latent [B, T, H, C] and q_rope [B, T, H, R]");
  TORCH_CHECK(pool_c.dim() == 3 && pool_r.dim() == 3, "pool_c [L, N, C] and pool_r [L, N, R]");
  TORCH_CHECK(pool_c.scalar_type() == at::kFloat && pool_r.scalar_type() == at::kFloat,
              "the paged attention kernel reads float32 pools");
  TORCH_CHECK(pool_c.is_contiguous() && pool_r.is_contiguous(), "pools must be contiguous");
  const int64_t B = q_latent.size(0), T = q_latent.size(1), H = q_latent.size(2), C = q_latent.size(3);
  const int64_t R = q_rope.size(3);
  TORCH_CHECK(pool_c.size(2) == C && pool_r.size(2) == R && pool_c.size(1) == pool_r.size(1),
              "pool widths do not match the queries");
  TORCH_CHECK(q_rope.size(0) == B && q_rope.size(1) == T && q_rope.size(2) == H, "q_rope shape");
  TORCH_CHECK(layer >= 0 && layer < pool_c.size(0), "layer ", layer, " outside the pool's ", pool_c.size(0));
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B, "block_table [B, W]");
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T, "positions [B, T]");
  TORCH_CHECK(block_size > 0 && pool_c.size(1) % block_size == 0, "pool slots must be whole blocks");
  const auto q = q_latent.to(at::kFloat).contiguous(), qr = q_rope.to(at::kFloat).contiguous();
  const auto table = block_table.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  auto out = at::empty({B, T, H, C}, q.options());
  if (B * T == 0) return out.to(q_latent.scalar_type());
  Problem p{q.data_ptr<float>(), qr.data_ptr<float>(), pool_c.select(0, layer).data_ptr<float>(),
            pool_r.select(0, layer).data_ptr<float>(), table.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
            out.data_ptr<float>(), B, T, H, C, R, table.size(1), block_size, pool_c.size(1) / block_size,
            static_cast<float>(scale)};
  attend(p);
  return out.to(q_latent.scalar_type());
}

}  // namespace

TORCH_LIBRARY(openr2, m) {
  m.def("paged_latent_attention(Tensor q_latent, Tensor q_rope, Tensor pool_c, Tensor pool_r, int layer, "
        "Tensor block_table, Tensor positions, int block_size, float scale) -> Tensor");
  // num_keys is a SymInt: a compiled step's key count follows its dynamic block-table width
  m.def("paged_index_scores(Tensor q_index, Tensor weights, Tensor pool_k, int layer, Tensor block_table, "
        "Tensor positions, SymInt num_keys, int block_size, float scale) -> Tensor");
  m.def("paged_index_amx(int index_dim, int block_size) -> bool", &paged_index_amx);
}

TORCH_LIBRARY_IMPL(openr2, CPU, m) {
  m.impl("paged_latent_attention", &paged_latent_attention);
  m.impl("paged_index_scores", &paged_index_scores);
}
