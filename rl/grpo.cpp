#include "rl/grpo.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace tessera::rl {

namespace {

// Host f32/f64 tensor -> f64 values (row-major).
std::vector<double> host_f64(const Tensor& t, const char* what) {
  TS_CHECK(t.defined(), what, " is undefined");
  TS_CHECK(t.device() == Device::cpu, what, " must be a host tensor, got ", t.str(), " on ", device_name(t.device()));
  TS_CHECK(t.is_contiguous(), what, " must be contiguous");
  TS_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64, what, " must be f32 or f64, got ", t.str());
  std::vector<double> v(size_t(t.numel()));
  if (t.dtype() == DType::f64) {
    std::copy(t.data<double>(), t.data<double>() + t.numel(), v.begin());
  } else {
    std::copy(t.data<float>(), t.data<float>() + t.numel(), v.begin());
  }
  return v;
}

void check_bt(const Tensor& t, const char* what, int64_t B, int64_t T) {
  TS_CHECK(t.ndim() == 2 && t.size(0) == B && t.size(1) == T, what, " must be (", B, ", ", T, "), got ", t.str());
}

std::vector<double> mask_values(const Tensor& mask) {
  auto m = host_f64(mask, "mask");
  for (size_t i = 0; i < m.size(); ++i)
    TS_CHECK(m[i] == 0.0 || m[i] == 1.0, "mask values must be 0 or 1, got ", m[i], " at flat index ", i);
  return m;
}

Tensor copy_mask_zero_rows(const Tensor& mask, const std::vector<uint8_t>& zero_row) {
  TS_CHECK(mask.ndim() == 2, "mask must be (B, T), got ", mask.str());
  const int64_t B = mask.size(0), T = mask.size(1);
  TS_CHECK(int64_t(zero_row.size()) == B, "row flags: ", zero_row.size(), " entries for ", B, " rows");
  mask_values(mask);  // validates
  Tensor out = mask.clone();
  for (int64_t b = 0; b < B; ++b) {
    if (!zero_row[size_t(b)]) continue;
    for (int64_t t = 0; t < T; ++t) {
      if (out.dtype() == DType::f64)
        out.data<double>()[b * T + t] = 0.0;
      else
        out.data<float>()[b * T + t] = 0.0f;
    }
  }
  return out;
}

template <class E>
E parse_name(const std::string& name, const char* what, std::initializer_list<std::pair<const char*, E>> table) {
  std::string known;
  for (const auto& [n, e] : table) {
    if (name == n) return e;
    known += known.empty() ? n : std::string(", ") + n;
  }
  TS_FAIL(what, " '", name, "': unknown; known: ", known);
}

}  // namespace

// ----------------------------------------------------------------------------------------------- advantages

AdvantageEstimator parse_advantage_estimator(const std::string& name) {
  return parse_name<AdvantageEstimator>(name, "advantage estimator",
                                        {{"dr_grpo", AdvantageEstimator::dr_grpo},
                                         {"group_norm", AdvantageEstimator::group_norm},
                                         {"rloo", AdvantageEstimator::rloo}});
}

const char* advantage_estimator_name(AdvantageEstimator e) {
  switch (e) {
    case AdvantageEstimator::group_norm: return "group_norm";
    case AdvantageEstimator::dr_grpo: return "dr_grpo";
    case AdvantageEstimator::rloo: return "rloo";
  }
  return "?";
}

Advantages compute_advantages(const std::vector<double>& rewards, int64_t group_size, AdvantageEstimator estimator,
                              double eps) {
  if (group_size < 2) TS_FAIL("GRPO group size must be >= 2 (a group of one has no baseline), got ", group_size);
  if (!(eps > 0.0) || !std::isfinite(eps)) TS_FAIL("advantage eps must be finite and > 0, got ", eps);
  const int64_t n = int64_t(rewards.size());
  if (n % group_size != 0)
    TS_FAIL(n, " rewards do not split into groups of ", group_size, " (the batch must hold whole groups)");
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(rewards[size_t(i)])) TS_FAIL("reward ", i, " is not finite: ", rewards[size_t(i)]);

  Advantages out;
  out.values.assign(size_t(n), 0.0);
  out.groups = n / group_size;
  const double G = double(group_size);
  for (int64_t g = 0; g < out.groups; ++g) {
    const double* r = rewards.data() + g * group_size;
    double* a = out.values.data() + g * group_size;
    const auto [lo, hi] = std::minmax_element(r, r + group_size);
    if (*lo == *hi) {  // all equal: no signal, every estimator gives exactly 0
      ++out.zero_std_groups;
      continue;
    }
    double sum = 0;
    for (int64_t i = 0; i < group_size; ++i) sum += r[i];
    const double mean = sum / G;
    switch (estimator) {
      case AdvantageEstimator::group_norm: {
        double ss = 0;
        for (int64_t i = 0; i < group_size; ++i) ss += (r[i] - mean) * (r[i] - mean);
        const double std = std::sqrt(ss / (G - 1.0));  // sample std (torch.std's default, as verl)
        for (int64_t i = 0; i < group_size; ++i) a[i] = (r[i] - mean) / (std + eps);
        break;
      }
      case AdvantageEstimator::dr_grpo:
        for (int64_t i = 0; i < group_size; ++i) a[i] = r[i] - mean;
        break;
      case AdvantageEstimator::rloo:
        for (int64_t i = 0; i < group_size; ++i) a[i] = r[i] - (sum - r[i]) / (G - 1.0);
        break;
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------- the loss

KlEstimator parse_kl_estimator(const std::string& name) {
  return parse_name<KlEstimator>(name, "KL estimator",
                                 {{"k1", KlEstimator::k1},
                                  {"k2", KlEstimator::k2},
                                  {"k3", KlEstimator::k3},
                                  {"k3_ratio", KlEstimator::k3_ratio}});
}

const char* kl_estimator_name(KlEstimator e) {
  switch (e) {
    case KlEstimator::k1: return "k1";
    case KlEstimator::k2: return "k2";
    case KlEstimator::k3: return "k3";
    case KlEstimator::k3_ratio: return "k3_ratio";
  }
  return "?";
}

LossAggregation parse_loss_aggregation(const std::string& name) {
  return parse_name<LossAggregation>(name, "loss aggregation",
                                     {{"seq-mean-token-mean", LossAggregation::seq_mean_token_mean},
                                      {"seq-mean-token-sum-norm", LossAggregation::seq_mean_token_sum_norm},
                                      {"token-mean", LossAggregation::token_mean}});
}

const char* loss_aggregation_name(LossAggregation a) {
  switch (a) {
    case LossAggregation::token_mean: return "token-mean";
    case LossAggregation::seq_mean_token_mean: return "seq-mean-token-mean";
    case LossAggregation::seq_mean_token_sum_norm: return "seq-mean-token-sum-norm";
  }
  return "?";
}

void PolicyLossConfig::validate() const {
  if (!(eps_low >= 0.0 && eps_low < 1.0)) TS_FAIL("eps_low must be in [0, 1), got ", eps_low);
  if (!(eps_high >= 0.0) || !std::isfinite(eps_high)) TS_FAIL("eps_high must be finite and >= 0, got ", eps_high);
  if (!(dual_clip_c == 0.0 || (dual_clip_c > 1.0 && std::isfinite(dual_clip_c))))
    TS_FAIL("dual_clip_c must be 0 (off) or > 1 (verl uses 3), got ", dual_clip_c);
  if (!(beta >= 0.0) || !std::isfinite(beta)) TS_FAIL("beta (KL coefficient) must be finite and >= 0, got ", beta);
  if (aggregation == LossAggregation::seq_mean_token_sum_norm && !(norm_constant > 0.0 && std::isfinite(norm_constant)))
    TS_FAIL("norm_constant must be > 0 for seq-mean-token-sum-norm (e.g. the max response length), got ",
            norm_constant);
}

LossCounts count_loss_tokens(const Tensor& mask) {
  TS_CHECK(mask.ndim() == 2, "mask must be (B, T), got ", mask.str());
  const int64_t B = mask.size(0), T = mask.size(1);
  const auto m = mask_values(mask);
  LossCounts c;
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) n += m[size_t(b * T + t)] != 0.0;
    c.tokens += n;
    c.seqs += n > 0;
  }
  return c;
}

PolicyLossStats& PolicyLossStats::operator+=(const PolicyLossStats& o) {
  tokens += o.tokens;
  clipped_low += o.clipped_low;
  clipped_high += o.clipped_high;
  dual_clipped += o.dual_clipped;
  ratio_sum += o.ratio_sum;
  kl_sum += o.kl_sum;
  pg_loss += o.pg_loss;
  kl_loss += o.kl_loss;
  return *this;
}

PolicyLossResult policy_loss(const PolicyLossInputs& in, const PolicyLossConfig& cfg, const LossCounts& global) {
  cfg.validate();
  TS_CHECK(in.logp.defined() && in.logp.ndim() == 2, "logp must be (B, T), got ",
           in.logp.defined() ? in.logp.str() : "undefined");
  const int64_t B = in.logp.size(0), T = in.logp.size(1);
  check_bt(in.logp_old, "logp_old", B, T);
  check_bt(in.mask, "mask", B, T);
  const bool have_ref = in.logp_ref.defined();
  if (have_ref) check_bt(in.logp_ref, "logp_ref", B, T);
  if (cfg.beta > 0.0 && !have_ref) TS_FAIL("beta = ", cfg.beta, " > 0 needs the reference log-probabilities (logp_ref)");
  TS_CHECK(in.advantages.defined(), "advantages are undefined");
  const bool per_token_adv = in.advantages.ndim() == 2;
  TS_CHECK((in.advantages.ndim() == 1 && in.advantages.size(0) == B) || (per_token_adv && in.advantages.size(0) == B &&
                                                                        in.advantages.size(1) == T),
           "advantages must be (", B, ") or (", B, ", ", T, "), got ", in.advantages.str());

  const auto lp = host_f64(in.logp, "logp");
  const auto lo = host_f64(in.logp_old, "logp_old");
  const auto lr = have_ref ? host_f64(in.logp_ref, "logp_ref") : std::vector<double>{};
  const auto adv = host_f64(in.advantages, "advantages");
  const auto m = mask_values(in.mask);

  const LossCounts local = count_loss_tokens(in.mask);
  TS_CHECK(global.tokens >= local.tokens && global.seqs >= local.seqs, "global counts (", global.tokens, " tokens, ",
           global.seqs, " seqs) are smaller than this part's (", local.tokens, " tokens, ", local.seqs,
           " seqs): pass the counts of the whole global batch");

  const double lo_clip = 1.0 - cfg.eps_low, hi_clip = 1.0 + cfg.eps_high;
  const bool dual = cfg.dual_clip_c > 0.0;

  PolicyLossResult res;
  std::vector<double> g(size_t(B * T), 0.0);
  PolicyLossStats& st = res.stats;

  for (int64_t b = 0; b < B; ++b) {
    int64_t n_b = 0;
    for (int64_t t = 0; t < T; ++t) n_b += m[size_t(b * T + t)] != 0.0;
    if (n_b == 0) continue;  // a fully masked row: nothing, and no division
    // The aggregation weight of every token of this row.
    double w = 0.0;
    switch (cfg.aggregation) {
      case LossAggregation::token_mean: w = 1.0 / double(global.tokens); break;
      case LossAggregation::seq_mean_token_mean: w = 1.0 / (double(n_b) * double(global.seqs)); break;
      case LossAggregation::seq_mean_token_sum_norm:
        w = 1.0 / (double(global.seqs) * cfg.norm_constant);
        break;
    }
    double pg_row = 0.0, kl_row = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      const size_t i = size_t(b * T + t);
      if (m[i] == 0.0) continue;
      const double A = per_token_adv ? adv[i] : adv[size_t(b)];
      TS_CHECK(std::isfinite(lp[i]) && std::isfinite(lo[i]) && std::isfinite(A), "non-finite input at row ", b,
               ", token ", t, ": logp ", lp[i], ", logp_old ", lo[i], ", advantage ", A);
      const double d = lp[i] - lo[i];
      const double dc = std::clamp(d, -20.0, 20.0);
      const double rho = std::exp(dc);
      const double drho = (d >= -20.0 && d <= 20.0) ? rho : 0.0;  // d rho / d logp

      // Clipped surrogate.
      double l, dl;
      const double unclipped = -A * rho;
      if (A > 0.0 && rho > hi_clip) {
        l = -A * hi_clip, dl = 0.0;
        ++st.clipped_high;
      } else if (A < 0.0 && rho < lo_clip) {
        l = -A * lo_clip, dl = 0.0;
        ++st.clipped_low;
      } else {
        l = unclipped, dl = -A * drho;
      }
      if (dual && A < 0.0 && -A * cfg.dual_clip_c < l) {
        l = -A * cfg.dual_clip_c, dl = 0.0;
        ++st.dual_clipped;
      }

      // KL to the reference.
      double kl = 0.0, dkl = 0.0;
      if (have_ref) {
        TS_CHECK(std::isfinite(lr[i]), "non-finite logp_ref at row ", b, ", token ", t);
        const double dr = lp[i] - lr[i];
        switch (cfg.kl) {
          case KlEstimator::k1: kl = dr, dkl = 1.0; break;
          case KlEstimator::k2: kl = 0.5 * dr * dr, dkl = dr; break;
          case KlEstimator::k3:
          case KlEstimator::k3_ratio: {
            const double drc = std::clamp(dr, -20.0, 20.0);
            const double e = std::exp(-drc);
            const double k3 = e + drc - 1.0;
            const bool inside = dr >= -20.0 && dr <= 20.0;
            double dk3 = inside ? 1.0 - e : 0.0;
            kl = k3;
            if (k3 > 10.0) kl = 10.0, dk3 = 0.0;  // k3 >= 0, so only the upper clamp can be active
            if (cfg.kl == KlEstimator::k3_ratio) {
              kl *= rho;   // rho detached: it scales, it is not differentiated
              dk3 *= rho;
            }
            dkl = dk3;
            break;
          }
        }
      }

      pg_row += l;
      kl_row += kl;
      g[i] = w * (dl + cfg.beta * dkl);
      ++st.tokens;
      st.ratio_sum += rho;
      st.kl_sum += kl;
    }
    st.pg_loss += pg_row * w;
    st.kl_loss += kl_row * w;
  }
  res.loss = st.pg_loss + cfg.beta * st.kl_loss;

  res.dlogp = Tensor::empty({B, T}, in.logp.dtype(), Device::cpu);
  if (res.dlogp.dtype() == DType::f64)
    std::copy(g.begin(), g.end(), res.dlogp.data<double>());
  else
    for (size_t i = 0; i < g.size(); ++i) res.dlogp.data<float>()[i] = float(g[i]);
  return res;
}

// ------------------------------------------------------------------------------------------ logits <-> logp

namespace {
template <class T>
void logprob_rows(const Tensor& logits, const int32_t* tg, std::vector<double>* logp, const double* dlogp, T* dl) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const T* x = logits.data<T>();
  for (int64_t i = 0; i < N; ++i) {
    const T* xi = x + i * V;
    const int32_t t = tg[i];
    if (t < 0) {
      if (logp) (*logp)[size_t(i)] = 0.0;
      if (dl) std::fill(dl + i * V, dl + (i + 1) * V, T(0));
      continue;
    }
    TS_CHECK(t < V, "target id ", t, " at row ", i, " is outside the vocabulary [0, ", V, ")");
    double mx = double(*std::max_element(xi, xi + V)), s = 0.0;
    for (int64_t j = 0; j < V; ++j) s += std::exp(double(xi[j]) - mx);
    const double lse = mx + std::log(s);
    if (logp) (*logp)[size_t(i)] = double(xi[t]) - lse;
    if (dl) {
      const double gi = dlogp[i];
      T* di = dl + i * V;
      for (int64_t j = 0; j < V; ++j) di[j] = T(-gi * std::exp(double(xi[j]) - lse));
      di[t] = T(gi * (1.0 - std::exp(double(xi[t]) - lse)));
    }
  }
}

void check_logits(const Tensor& logits, const Tensor& targets) {
  TS_CHECK(logits.defined() && logits.ndim() == 2, "logits must be (N, V)");
  TS_CHECK(logits.device() == Device::cpu && logits.is_contiguous(), "logits must be a contiguous host tensor");
  TS_CHECK(logits.dtype() == DType::f32 || logits.dtype() == DType::f64, "logits must be f32 or f64, got ",
           logits.str());
  TS_CHECK(targets.defined() && targets.dtype() == DType::i32 && targets.numel() == logits.size(0) &&
               targets.device() == Device::cpu && targets.is_contiguous(),
           "targets must be host i32 with ", logits.size(0), " entries");
}
}  // namespace

Tensor token_logprobs(const Tensor& logits, const Tensor& targets) {
  check_logits(logits, targets);
  const int64_t N = logits.size(0);
  std::vector<double> lp(static_cast<size_t>(N));
  if (logits.dtype() == DType::f64)
    logprob_rows<double>(logits, targets.data<int32_t>(), &lp, nullptr, nullptr);
  else
    logprob_rows<float>(logits, targets.data<int32_t>(), &lp, nullptr, nullptr);
  Tensor out = Tensor::empty({N}, logits.dtype(), Device::cpu);
  for (int64_t i = 0; i < N; ++i) {
    if (out.dtype() == DType::f64)
      out.data<double>()[i] = lp[size_t(i)];
    else
      out.data<float>()[i] = float(lp[size_t(i)]);
  }
  return out;
}

void token_logprobs_backward(const Tensor& logits, const Tensor& targets, const Tensor& dlogp, const Tensor& dlogits) {
  check_logits(logits, targets);
  TS_CHECK(dlogits.defined() && dlogits.shape() == logits.shape() && dlogits.dtype() == logits.dtype() &&
               dlogits.device() == Device::cpu && dlogits.is_contiguous(),
           "dlogits must be a contiguous host tensor like logits ", logits.str());
  const auto g = host_f64(dlogp, "dlogp");
  TS_CHECK(int64_t(g.size()) == logits.size(0), "dlogp must have ", logits.size(0), " entries, got ", g.size());
  if (logits.dtype() == DType::f64)
    logprob_rows<double>(logits, targets.data<int32_t>(), nullptr, g.data(), dlogits.data<double>());
  else
    logprob_rows<float>(logits, targets.data<int32_t>(), nullptr, g.data(), dlogits.data<float>());
}

// ----------------------------------------------------------------------------------------------- options

double overlong_penalty(int64_t response_len, int64_t max_len, int64_t buffer, double factor) {
  if (!(buffer > 0 && buffer <= max_len))
    TS_FAIL("overlong buffer must be in (0, max_len = ", max_len, "], got ", buffer);
  if (!(factor >= 0.0) || !std::isfinite(factor)) TS_FAIL("overlong penalty factor must be >= 0, got ", factor);
  TS_CHECK(response_len >= 0, "response length ", response_len, " < 0");
  const double expected = double(max_len - buffer);
  return std::min(-(double(response_len) - expected) / double(buffer) * factor, 0.0);
}

Tensor mask_truncated(const Tensor& mask, const std::vector<uint8_t>& truncated) {
  return copy_mask_zero_rows(mask, truncated);
}

Tensor mask_rows(const Tensor& mask, const std::vector<uint8_t>& keep) {
  std::vector<uint8_t> zero(keep.size());
  for (size_t i = 0; i < keep.size(); ++i) zero[i] = keep[i] == 0;
  return copy_mask_zero_rows(mask, zero);
}

std::vector<uint8_t> offpolicy_sequence_keep(const Tensor& logp, const Tensor& logp_old, const Tensor& mask,
                                             const std::vector<double>& advantages, double delta) {
  TS_CHECK(logp.defined() && logp.ndim() == 2, "logp must be (B, T)");
  const int64_t B = logp.size(0), T = logp.size(1);
  check_bt(logp_old, "logp_old", B, T);
  check_bt(mask, "mask", B, T);
  TS_CHECK(int64_t(advantages.size()) == B, "advantages: ", advantages.size(), " entries for ", B, " rows");
  if (!(delta >= 0.0)) TS_FAIL("off-policy masking delta must be >= 0, got ", delta);
  const auto lp = host_f64(logp, "logp"), lo = host_f64(logp_old, "logp_old");
  const auto m = mask_values(mask);
  std::vector<uint8_t> keep(size_t(B), 1);
  for (int64_t b = 0; b < B; ++b) {
    if (!(advantages[size_t(b)] < 0.0)) continue;
    double s = 0.0;
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) {
      const size_t i = size_t(b * T + t);
      if (m[i] == 0.0) continue;
      s += lo[i] - lp[i];
      ++n;
    }
    if (n > 0 && s / double(n) > delta) keep[size_t(b)] = 0;
  }
  return keep;
}

}  // namespace tessera::rl
