// CPU decode attention over a paged, ragged KV cache: one new token per sequence, grouped-query
// heads, K/V read once, in place, from their blocks (executor/kernels.py has the torch-ops
// reference and the layout). Work items are (sequence, KV head) pairs split over torch's
// intra-op threads; each walks its blocks with a per-block softmax rescale (flash-decoding):
//
//   s_t = scale * q_i . k_t,   m' = max(m, max_t s_t),   p_t = exp(s_t - m'),
//   acc_i <- acc_i exp(m - m') + sum_t p_t v_t,   l_i <- l_i exp(m - m') + sum_t p_t,
//   out_i = acc_i / l_i                                    (i over the G query heads of a KV head)
//
// Scores, softmax and accumulation are fp32; bf16 K/V are widened to fp32 one row at a time.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float widen(float x) { return x; }

inline float widen(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename kv_t>
void attend(const float* q, const std::vector<const kv_t*>& k_blocks,
            const std::vector<const kv_t*>& v_blocks, const int64_t* lens, float* out,
            int64_t batch, int64_t kv_heads, int64_t group, int64_t block_tokens,
            int64_t head_dim, float scale) {
  const int64_t T = block_tokens, D = head_dim, G = group;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * T), acc(G * D), m(G), l(G);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / kv_heads, h = bh % kv_heads;
      const float* qh = q + bh * G * D;  // q [B, Hq, D] viewed as [B, Hkv, G, D]
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t j = 0; j * T < lens[b]; ++j) {
        const int64_t n = std::min(T, lens[b] - j * T);
        const int64_t offset = (b * kv_heads + h) * T * D;
        const kv_t* K = k_blocks[j] + offset;
        const kv_t* V = v_blocks[j] + offset;
        for (int64_t t = 0; t < n; ++t) {
          const kv_t* k = K + t * D;
          for (int64_t i = 0; i < G; ++i) {
            const float* qi = qh + i * D;
            float dot = 0.0f;
            for (int64_t d = 0; d < D; ++d) dot += qi[d] * widen(k[d]);
            scores[i * T + t] = dot * scale;
          }
        }
        for (int64_t i = 0; i < G; ++i) {
          float* s = scores.data() + i * T;
          const float block_max = *std::max_element(s, s + n);
          const float m_new = std::max(m[i], block_max);
          const float rescale = std::exp(m[i] - m_new);
          float* a = acc.data() + i * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= rescale;
          float sum = 0.0f;
          for (int64_t t = 0; t < n; ++t) {
            s[t] = std::exp(s[t] - m_new);
            sum += s[t];
          }
          l[i] = l[i] * rescale + sum;
          m[i] = m_new;
        }
        for (int64_t t = 0; t < n; ++t) {
          const kv_t* v = V + t * D;
          for (int64_t i = 0; i < G; ++i) {
            const float p = scores[i * T + t];
            float* a = acc.data() + i * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * widen(v[d]);
          }
        }
      }
      float* o = out + bh * G * D;
      for (int64_t i = 0; i < G; ++i)
        for (int64_t d = 0; d < D; ++d) o[i * D + d] = acc[i * D + d] / l[i];
    }
  });
}

// q: [B, Hq, D] fp32 contiguous; k_blocks[j], v_blocks[j]: [rows_j, Hkv, T, D] contiguous, one
// dtype (fp32 or bf16); lens: [B] int64, 1 <= lens[b], with rows_j > b for every block j that
// sequence b reaches. Returns [B, Hq, D] fp32.
torch::Tensor paged_decode_attention(torch::Tensor q, std::vector<torch::Tensor> k_blocks,
                                     std::vector<torch::Tensor> v_blocks, torch::Tensor lens,
                                     double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(),
              "q must be a contiguous fp32 [B, Hq, D] tensor");
  TORCH_CHECK(!k_blocks.empty() && k_blocks.size() == v_blocks.size(),
              "need the same positive number of K and V blocks");
  TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == torch::kInt64 && lens.is_contiguous(),
              "lens must be a contiguous int64 [B] tensor");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k_blocks[0].size(1), block_tokens = k_blocks[0].size(2);
  TORCH_CHECK(lens.size(0) == batch, "lens must have one entry per sequence");
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  const auto dtype = k_blocks[0].scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "KV must be fp32 or bf16");
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
    TORCH_CHECK(len[b] >= 1 && needed <= num_blocks && rows_min[needed - 1] > b,
                "sequence ", b, " (length ", len[b], ") reaches a block that does not hold it");
  }
  auto out = torch::empty({batch, heads, head_dim}, q.options());
  const int64_t group = heads / kv_heads;
  if (dtype == torch::kFloat32) {
    std::vector<const float*> kp, vp;
    for (int64_t j = 0; j < num_blocks; ++j) {
      kp.push_back(k_blocks[j].data_ptr<float>());
      vp.push_back(v_blocks[j].data_ptr<float>());
    }
    attend<float>(q.data_ptr<float>(), kp, vp, len, out.data_ptr<float>(), batch, kv_heads,
                  group, block_tokens, head_dim, static_cast<float>(scale));
  } else {
    std::vector<const c10::BFloat16*> kp, vp;
    for (int64_t j = 0; j < num_blocks; ++j) {
      kp.push_back(k_blocks[j].data_ptr<c10::BFloat16>());
      vp.push_back(v_blocks[j].data_ptr<c10::BFloat16>());
    }
    attend<c10::BFloat16>(q.data_ptr<float>(), kp, vp, len, out.data_ptr<float>(), batch,
                          kv_heads, group, block_tokens, head_dim, static_cast<float>(scale));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is released while the kernel runs: the main thread keeps launching GPU work
  m.def("paged_decode_attention", &paged_decode_attention,
        "GQA decode attention over a paged, ragged CPU KV cache (fp32 or bf16 KV)",
        py::call_guard<py::gil_scoped_release>());
}
