// CPU decode attention over a paged, ragged KV cache: one new token per sequence, grouped-query
// heads, K/V read once, in place, from their blocks (executor/kernels.py has the torch-ops
// reference and the layout). Work items are (sequence, KV head) pairs split over torch's
// intra-op threads; each walks its blocks with a per-block softmax rescale (flash-decoding):
//
//   s_t = scale * q_i . k_t,   m' = max(m, max_t s_t),   p_t = exp(s_t - m'),
//   acc_i <- acc_i exp(m - m') + sum_t p_t v_t,   l_i <- l_i exp(m - m') + sum_t p_t,
//   out_i = acc_i / l_i                                    (i over the G query heads of a KV head)
//
// Scores, softmax and accumulation are fp32. The work is explicitly vectorized in 16-lane fp32
// vectors (GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones), so that the kernel
// is bound by DRAM rather than by scalar arithmetic: rows are read in place (bf16 as 32-bit word
// pairs, `load_row`), or widened into zero-padded fp32 scratch rows where D is not a whole number
// of vectors; each K row is loaded once for all G heads; each head keeps its accumulator vectors
// in registers across a block's V rows; exp is a vector polynomial.
//
// Two layouts of the blocks (`BlockList`, `BlockTable`): per-block tensors of the sequences that
// reach the block (the static KV cache, `paged_decode_attention`), or a pool of blocks addressed
// through a block table per sequence (the continuous scheduler, `paged_decode_attention_table`).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t LANES = 16;
constexpr int64_t MAX_HEAD_DIM = 16 * LANES;
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint32_t uvec __attribute__((vector_size(LANES * sizeof(uint32_t))));

inline vec load(const float* p) { vec x; std::memcpy(&x, p, sizeof x); return x; }
inline void store(float* p, vec x) { std::memcpy(p, &x, sizeof x); }
inline vec splat(float x) { return vec{} + x; }

inline float sum(vec x) {
  float s = 0.0f;
  for (int64_t l = 0; l < LANES; ++l) s += x[l];
  return s;
}

// exp(x) for x <= 0 (Cephes expf: exp(x) = 2^n exp(r), r = x - n ln2, |r| <= ln2/2, degree-5
// polynomial; relative error ~1e-7); x below -87 gives exp(-87) ~ 1.6e-38.
inline vec exp_nonpositive(vec x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  // n = round(x / ln2): truncation of x / ln2 - 1/2 (<= 0) rounds to the nearest integer
  const ivec n_int = __builtin_convertvector(x * splat(1.44269504088896341f) - 0.5f, ivec);
  const vec n = __builtin_convertvector(n_int, vec);
  const vec r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const ivec bits = (n_int + 127) << 23;  // 2^n
  return p * (vec)bits;  // a same-size vector cast reinterprets the bits
}

// n rows of D elements -> fp32 rows of Dp columns, zero padded (for a head dim that is not a
// whole number of vectors).
template <typename kv_t>
void widen_rows(const kv_t* src, int64_t n, int64_t D, int64_t Dp, float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t d = 0; d < D; ++d) dst[r * Dp + d] = static_cast<float>(src[r * D + d]);
    std::fill(dst + r * Dp + D, dst + (r + 1) * Dp, 0.0f);
  }
}

// One row of Dp = NV * 16 elements into NV fp32 vectors. A bf16 row is read as 32-bit words of
// two bf16 (a bf16 is the high half of an fp32): word << 16 is the even element, word &
// 0xffff0000 the odd one, so each 32 elements become a vector of the even ones and a vector of
// the odd ones, with no shuffles. Dot products and sums over rows do not care about the order of
// a row's elements as long as q and the output use the same one (`lane`).
template <int64_t NV>
inline void load_row(const float* row, vec (&x)[NV]) {
  for (int64_t c = 0; c < NV; ++c) x[c] = load(row + c * LANES);
}

template <int64_t NV>
inline void load_row(const c10::BFloat16* row, vec (&x)[NV]) {
  static_assert(NV % 2 == 0, "a bf16 row is read 32 elements at a time");
  for (int64_t c = 0; c < NV / 2; ++c) {
    uvec words;
    std::memcpy(&words, row + 2 * c * LANES, sizeof words);
    x[2 * c] = (vec)(words << 16);
    x[2 * c + 1] = (vec)(words & 0xffff0000u);
  }
}

// Where element d of a row lands in load_row's vectors (lane index in [0, Dp)).
template <typename row_t>
inline int64_t lane(int64_t d) {
  if constexpr (std::is_same_v<row_t, float>) return d;
  const int64_t chunk = d / (2 * LANES), within = d % (2 * LANES);
  return chunk * 2 * LANES + (within % 2) * LANES + within / 2;
}

// One block of one (sequence, KV head): n rows of K and V (Dp elements each, rows Dp apart)
// fold into the running state of its G query heads (qs: scaled queries [G, Dp] in lane order;
// acc [G, Dp]; m, l [G]).
template <int64_t NV, typename row_t>
void fold_block(const float* qs, const row_t* K, const row_t* V, int64_t n, int64_t G,
                int64_t Tp, float* scores, float* acc, float* m, float* l) {
  constexpr int64_t Dp = NV * LANES;
  // scores: each K row is loaded once into registers and dotted with the G query heads
  for (int64_t t = 0; t < n; ++t) {
    vec k[NV];
    load_row<NV>(K + t * Dp, k);
    for (int64_t i = 0; i < G; ++i) {
      const float* qi = qs + i * Dp;
      vec dot = k[0] * load(qi);
      for (int64_t c = 1; c < NV; ++c) dot += k[c] * load(qi + c * LANES);
      scores[i * Tp + t] = sum(dot);
    }
  }
  for (int64_t i = 0; i < G; ++i) {
    // softmax: running max and sum, scores -> p_t (lanes past n are not used)
    float* s = scores + i * Tp;
    float block_max = s[0];
    for (int64_t t = 1; t < n; ++t) block_max = std::max(block_max, s[t]);
    const float m_new = std::max(m[i], block_max);
    const float rescale = std::exp(m[i] - m_new);  // 0 on the first block (m = -inf)
    float block_sum = 0.0f;
    for (int64_t t = 0; t < n; t += LANES) {
      const vec p = exp_nonpositive(load(s + t) - splat(m_new));
      store(s + t, p);
      for (int64_t u = 0; u < std::min(LANES, n - t); ++u) block_sum += p[u];
    }
    l[i] = l[i] * rescale + block_sum;
    m[i] = m_new;
    // acc_i <- acc_i * rescale + sum_t p_t v_t, the NV accumulators held in registers
    float* a = acc + i * Dp;
    vec av[NV];
    for (int64_t c = 0; c < NV; ++c) av[c] = load(a + c * LANES) * rescale;
    for (int64_t t = 0; t < n; ++t) {
      const vec p = splat(s[t]);
      vec v[NV];
      load_row<NV>(V + t * Dp, v);
      for (int64_t c = 0; c < NV; ++c) av[c] += p * v[c];
    }
    for (int64_t c = 0; c < NV; ++c) store(a + c * LANES, av[c]);
  }
}

// Where the rows of (sequence b, KV head h) in block j of the sequence lie: a list of per-block
// tensors [rows_j, Hkv, T, D] (the static KV cache), or a pool [N, Hkv, T, D] with a block table
// per sequence (the continuous scheduler's cache). Item bh = b * Hkv + h.
template <typename kv_type>
struct BlockList {
  using kv_t = kv_type;
  std::vector<const kv_t*> k, v;
  int64_t block_elems;  // T * D
  const kv_t* key(int64_t j, int64_t bh) const { return k[j] + bh * block_elems; }
  const kv_t* value(int64_t j, int64_t bh) const { return v[j] + bh * block_elems; }
};

template <typename kv_type>
struct BlockTable {
  using kv_t = kv_type;
  const kv_t *k, *v;
  const int64_t* table;  // [B, max_blocks]: block j of sequence b is table[b * max_blocks + j]
  int64_t max_blocks, kv_heads, block_elems;
  int64_t at(int64_t j, int64_t bh) const {
    const int64_t b = bh / kv_heads, h = bh % kv_heads;
    return (table[b * max_blocks + j] * kv_heads + h) * block_elems;
  }
  const kv_t* key(int64_t j, int64_t bh) const { return k + at(j, bh); }
  const kv_t* value(int64_t j, int64_t bh) const { return v + at(j, bh); }
};

// Items are (sequence, KV head) pairs, split into one contiguous range per thread with about
// equal numbers of KV rows (lengths vary). A thread walks the blocks in its outer loop, so that
// with a BlockList it reads each block's rows of its items as one contiguous stream, and keeps
// every item's running state (acc, m, l) in cache. Rows are read in place where D == Dp (bf16:
// NV even), else widened into fp32 scratch rows.
template <int64_t NV, typename Blocks>
void attend(const float* q, const Blocks& blocks, const int64_t* lens, float* out,
            int64_t batch, int64_t kv_heads, int64_t group, int64_t block_tokens,
            int64_t head_dim, float scale) {
  using kv_t = typename Blocks::kv_t;
  constexpr int64_t Dp = NV * LANES;
  constexpr bool can_read_in_place = std::is_same_v<kv_t, float> || NV % 2 == 0;
  const int64_t T = block_tokens, D = head_dim, G = group;
  const int64_t Tp = (T + LANES - 1) / LANES * LANES;
  const bool in_place = can_read_in_place && D == Dp;
  auto lane_of = [&](int64_t d) { return in_place ? lane<kv_t>(d) : d; };

  auto attend_range = [&](int64_t begin, int64_t end) {
    const int64_t items = end - begin;
    std::vector<float> qs(items * G * Dp, 0.0f), acc(items * G * Dp, 0.0f),
        m(items * G, -std::numeric_limits<float>::infinity()), l(items * G, 0.0f),
        k_rows(in_place ? 0 : T * Dp), v_rows(in_place ? 0 : T * Dp), scores(G * Tp, 0.0f);
    for (int64_t x = 0; x < items * G; ++x) {  // q [B, Hq, D] = [B, Hkv, G, D], times scale
      const float* qx = q + (begin * G + x) * D;
      for (int64_t d = 0; d < D; ++d) qs[x * Dp + lane_of(d)] = qx[d] * scale;
    }
    // lengths do not increase with b, so the range's first sequence reaches the most blocks
    for (int64_t j = 0; j * T < lens[begin / kv_heads]; ++j) {
      for (int64_t bh = begin; bh < end && j * T < lens[bh / kv_heads]; ++bh) {
        const int64_t n = std::min(T, lens[bh / kv_heads] - j * T), x = bh - begin;
        const kv_t* K = blocks.key(j, bh);
        const kv_t* V = blocks.value(j, bh);
        float *state = acc.data() + x * G * Dp, *mx = m.data() + x * G, *lx = l.data() + x * G;
        if constexpr (can_read_in_place) {
          if (in_place) {
            fold_block<NV>(qs.data() + x * G * Dp, K, V, n, G, Tp, scores.data(), state, mx, lx);
            continue;
          }
        }
        widen_rows(K, n, D, Dp, k_rows.data());
        widen_rows(V, n, D, Dp, v_rows.data());
        fold_block<NV>(qs.data() + x * G * Dp, k_rows.data(), v_rows.data(), n, G, Tp,
                       scores.data(), state, mx, lx);
      }
    }
    for (int64_t x = 0; x < items * G; ++x) {
      float* o = out + (begin * G + x) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[x * Dp + lane_of(d)] / l[x];
    }
  };

  const int64_t items = batch * kv_heads;
  const int64_t ranges = std::min<int64_t>(at::get_num_threads(), items);
  int64_t rows_total = 0;
  for (int64_t b = 0; b < batch; ++b) rows_total += lens[b] * kv_heads;
  std::vector<int64_t> first(ranges + 1, items);  // range r holds items first[r]..first[r+1]-1
  first[0] = 0;
  for (int64_t bh = 0, rows = 0, r = 1; bh < items && r < ranges; ++bh) {
    rows += lens[bh / kv_heads];
    if (rows * ranges >= r * rows_total) first[r++] = bh + 1;
  }
  at::parallel_for(0, ranges, 1, [&](int64_t range_begin, int64_t range_end) {
    for (int64_t r = range_begin; r < range_end; ++r)
      if (first[r] < first[r + 1]) attend_range(first[r], first[r + 1]);
  });
}

// attend<NV> for the smallest NV in {1, 2, 4, 8, 16} with NV * 16 >= D (D <= 256)
template <typename Blocks, typename... Args>
void attend_padded(int64_t head_dim, Args&&... args) {
  const int64_t nv = (head_dim + LANES - 1) / LANES;
  if (nv <= 1) return attend<1, Blocks>(args...);
  if (nv <= 2) return attend<2, Blocks>(args...);
  if (nv <= 4) return attend<4, Blocks>(args...);
  if (nv <= 8) return attend<8, Blocks>(args...);
  return attend<16, Blocks>(args...);
}

// Checks shared by both entry points; returns the KV dtype.
c10::ScalarType check_inputs(const torch::Tensor& q, const torch::Tensor& lens,
                             const torch::Tensor& k_like, int64_t kv_heads) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(),
              "q must be a contiguous fp32 [B, Hq, D] tensor");
  TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == torch::kInt64 && lens.is_contiguous(),
              "lens must be a contiguous int64 [B] tensor");
  TORCH_CHECK(lens.size(0) == q.size(0), "lens must have one entry per sequence");
  TORCH_CHECK(q.size(1) % kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.size(2) <= MAX_HEAD_DIM, "head_dim ", q.size(2), " > ", MAX_HEAD_DIM);
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < lens.size(0); ++b) {
    TORCH_CHECK(len[b] >= 1 && (b == 0 || len[b] <= len[b - 1]),
                "lens must be positive and non-increasing");
  }
  const auto dtype = k_like.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "KV must be fp32 or bf16");
  return dtype;
}

// Calls f(kv_t{}) with the C++ type of `dtype` (fp32 or bf16).
template <typename F>
void with_kv_type(c10::ScalarType dtype, F&& f) {
  if (dtype == torch::kFloat32) {
    f(float{});
  } else {
    f(c10::BFloat16{});
  }
}

// q: [B, Hq, D] fp32 contiguous; k_blocks[j], v_blocks[j]: [rows_j, Hkv, T, D] contiguous, one
// dtype (fp32 or bf16); lens: [B] int64, positive, non-increasing, with rows_j > b for every
// block j that sequence b reaches. Returns [B, Hq, D] fp32.
torch::Tensor paged_decode_attention(torch::Tensor q, std::vector<torch::Tensor> k_blocks,
                                     std::vector<torch::Tensor> v_blocks, torch::Tensor lens,
                                     double scale) {
  TORCH_CHECK(!k_blocks.empty() && k_blocks.size() == v_blocks.size(),
              "need the same positive number of K and V blocks");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k_blocks[0].size(1), block_tokens = k_blocks[0].size(2);
  const auto dtype = check_inputs(q, lens, k_blocks[0], kv_heads);
  const int64_t num_blocks = static_cast<int64_t>(k_blocks.size());
  std::vector<int64_t> rows_min(num_blocks);  // min over blocks 0..j of their rows
  for (int64_t j = 0; j < num_blocks; ++j) {
    for (const auto& t : {k_blocks[j], v_blocks[j]}) {
      TORCH_CHECK(t.dim() == 4 && t.size(1) == kv_heads && t.size(2) == block_tokens &&
                      t.size(3) == head_dim && t.scalar_type() == dtype && t.is_contiguous(),
                  "KV block ", j, " must be a contiguous [rows, Hkv, T, D] tensor of the KV dtype");
    }
    TORCH_CHECK(k_blocks[j].size(0) == v_blocks[j].size(0), "K and V block ", j, " differ");
    rows_min[j] = std::min(k_blocks[j].size(0), j ? rows_min[j - 1] : k_blocks[j].size(0));
  }
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t needed = (len[b] + block_tokens - 1) / block_tokens;
    TORCH_CHECK(needed <= num_blocks && rows_min[needed - 1] > b, "sequence ", b, " (length ",
                len[b], ") reaches a block that does not hold it");
  }
  auto out = torch::empty({batch, heads, head_dim}, q.options());
  with_kv_type(dtype, [&](auto tag) {
    using kv_t = decltype(tag);
    BlockList<kv_t> blocks{{}, {}, block_tokens * head_dim};
    for (int64_t j = 0; j < num_blocks; ++j) {
      blocks.k.push_back(k_blocks[j].data_ptr<kv_t>());
      blocks.v.push_back(v_blocks[j].data_ptr<kv_t>());
    }
    attend_padded<BlockList<kv_t>>(head_dim, q.data_ptr<float>(), blocks, len,
                                   out.data_ptr<float>(), batch, kv_heads, heads / kv_heads,
                                   block_tokens, head_dim, static_cast<float>(scale));
  });
  return out;
}

// q: [B, Hq, D] fp32 contiguous; k_pool, v_pool: [N, Hkv, T, D] contiguous, one dtype (fp32 or
// bf16); block_table: [B, M] int64, block j < ceil(lens[b] / T) of sequence b is pool block
// block_table[b, j]; lens: [B] int64, positive, non-increasing. Returns [B, Hq, D] fp32.
torch::Tensor paged_decode_attention_table(torch::Tensor q, torch::Tensor k_pool,
                                           torch::Tensor v_pool, torch::Tensor block_table,
                                           torch::Tensor lens, double scale) {
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes() && k_pool.is_contiguous() &&
                  v_pool.is_contiguous() && k_pool.scalar_type() == v_pool.scalar_type() &&
                  k_pool.size(3) == head_dim,
              "k_pool and v_pool must be contiguous [N, Hkv, T, D] tensors of one dtype");
  const int64_t num_blocks = k_pool.size(0), kv_heads = k_pool.size(1),
                block_tokens = k_pool.size(2);
  const auto dtype = check_inputs(q, lens, k_pool, kv_heads);
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == torch::kInt64 &&
                  block_table.is_contiguous() && block_table.size(0) == batch,
              "block_table must be a contiguous int64 [B, max_blocks] tensor");
  const int64_t max_blocks = block_table.size(1);
  const int64_t *len = lens.data_ptr<int64_t>(), *table = block_table.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t needed = (len[b] + block_tokens - 1) / block_tokens;
    TORCH_CHECK(needed <= max_blocks, "sequence ", b, " (length ", len[b], ") needs ", needed,
                " blocks, the table has ", max_blocks);
    for (int64_t j = 0; j < needed; ++j) {
      const int64_t block = table[b * max_blocks + j];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block ", block, " of sequence ", b,
                  " is not in the pool of ", num_blocks);
    }
  }
  auto out = torch::empty({batch, heads, head_dim}, q.options());
  with_kv_type(dtype, [&](auto tag) {
    using kv_t = decltype(tag);
    const BlockTable<kv_t> blocks{k_pool.data_ptr<kv_t>(), v_pool.data_ptr<kv_t>(), table,
                                  max_blocks, kv_heads, block_tokens * head_dim};
    attend_padded<BlockTable<kv_t>>(head_dim, q.data_ptr<float>(), blocks, len,
                                    out.data_ptr<float>(), batch, kv_heads, heads / kv_heads,
                                    block_tokens, head_dim, static_cast<float>(scale));
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released while the kernels run: the main thread keeps launching GPU work
  m.def("paged_decode_attention", &paged_decode_attention,
        "GQA decode attention over a paged, ragged CPU KV cache (fp32 or bf16 KV)",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention_table", &paged_decode_attention_table,
        "the same over a block pool addressed by a block table per sequence",
        py::call_guard<py::gil_scoped_release>());
}
