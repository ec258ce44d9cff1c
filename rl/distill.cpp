#include "rl/distill.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"

namespace tessera::rl {

namespace {

void check_host_float(const Tensor& t, const char* what) {
  TS_CHECK(t.defined(), what, " is undefined");
  TS_CHECK(t.device() == Device::cpu, what, " must be a host tensor, got ", t.str(), " on ",
           device_name(t.device()));
  TS_CHECK(t.is_contiguous(), what, " must be contiguous");
  TS_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64, what, " must be f32 or f64, got ", t.str());
}

double at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::f64 ? t.data<double>()[i] : double(t.data<float>()[i]);
}

void put(const Tensor& t, int64_t i, double v) {
  if (t.dtype() == DType::f64)
    t.data<double>()[i] = v;
  else
    t.data<float>()[i] = float(v);
}

// Weights: finite and >= 0 (a NaN weight would silently drop or poison a row).
std::vector<double> weight_values(const Tensor& weights, int64_t n) {
  check_host_float(weights, "weights");
  TS_CHECK(weights.numel() == n, "weights must have ", n, " entries, got ", weights.str());
  std::vector<double> w(size_t(weights.numel()));
  for (int64_t i = 0; i < n; ++i) {
    w[size_t(i)] = at(weights, i);
    TS_CHECK(std::isfinite(w[size_t(i)]) && w[size_t(i)] >= 0.0, "weights must be finite and >= 0, got ",
             w[size_t(i)], " at flat index ", i);
  }
  return w;
}

void check_normalizer(double normalizer, const std::vector<double>& w) {
  const bool any = std::any_of(w.begin(), w.end(), [](double x) { return x != 0.0; });
  if (any)
    TS_CHECK(
        std::isfinite(normalizer) && normalizer > 0.0,
        "normalizer must be finite and > 0 when a row is weighted (the global count of weighted rows), got ",
        normalizer);
}

// out[j] = log_softmax(x / tau)[j] in f64 with max subtraction. Logits may be -inf, not NaN or +inf; at least
// one must be finite.
template <class T>
void log_softmax_row(const T* x, int64_t V, double tau, double* out, const char* who, int64_t row) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < V; ++j) {
    const double v = double(x[j]);
    if (std::isnan(v) || v == std::numeric_limits<double>::infinity())
      TS_FAIL(who, " logit at row ", row, ", token ", j, " is ", v,
              ": logits of weighted rows must be finite or -inf (give the row weight 0 to skip it)");
    out[j] = v / tau;
    mx = std::max(mx, out[j]);
  }
  if (mx == -std::numeric_limits<double>::infinity())
    TS_FAIL(who, " logits at row ", row, " are all -inf: no token is possible");
  double s = 0.0;
  for (int64_t j = 0; j < V; ++j) s += std::exp(out[j] - mx);
  const double lse = mx + std::log(s);
  for (int64_t j = 0; j < V; ++j) out[j] -= lse;
}

void log_softmax_any(const Tensor& logits, int64_t row, double tau, double* out, const char* who) {
  const int64_t V = logits.size(1);
  if (logits.dtype() == DType::f64)
    log_softmax_row(logits.data<double>() + row * V, V, tau, out, who, row);
  else
    log_softmax_row(logits.data<float>() + row * V, V, tau, out, who, row);
}

// log(a + b) from log a and log b (either may be -inf).
double log_add_exp(double la, double lb) {
  const double m = std::max(la, lb);
  if (m == -std::numeric_limits<double>::infinity()) return m;
  return m + std::log(std::exp(la - m) + std::exp(lb - m));
}

// x * (la - lb) with the convention 0 * anything = 0 (x = exp(la) underflowed or la = -inf).
double plogratio(double x, double la, double lb) {
  return x > 0.0 ? x * (la - lb) : 0.0;
}

template <class E>
E parse_name(const std::string& name, const char* what,
             std::initializer_list<std::pair<const char*, E>> table) {
  std::string known;
  for (const auto& [n, e] : table) {
    if (name == n) return e;
    known += known.empty() ? n : std::string(", ") + n;
  }
  TS_FAIL(what, " '", name, "': unknown; known: ", known);
}

void add_metric(DistillMetrics& m, double d) {
  m.divergence_max = m.tokens ? std::max(m.divergence_max, d) : d;
  m.divergence_sum += d;
  m.tokens += 1;
}

void check_same_shape(const Tensor& a, const Tensor& b, const char* an, const char* bn) {
  TS_CHECK(a.shape() == b.shape(), an, " ", a.str(), " and ", bn, " ", b.str(), " must have the same shape");
}

}  // namespace

DistillDivergence parse_distill_divergence(const std::string& name) {
  return parse_name<DistillDivergence>(name, "distillation divergence",
                                       {{"reverse_kl", DistillDivergence::reverse_kl},
                                        {"forward_kl", DistillDivergence::forward_kl},
                                        {"jsd", DistillDivergence::jsd}});
}

const char* distill_divergence_name(DistillDivergence d) {
  switch (d) {
    case DistillDivergence::reverse_kl:
      return "reverse_kl";
    case DistillDivergence::forward_kl:
      return "forward_kl";
    case DistillDivergence::jsd:
      return "jsd";
  }
  return "?";
}

void DistillConfig::validate() const {
  if (!(std::isfinite(temperature) && temperature > 0.0))
    TS_FAIL("distillation temperature must be finite and > 0, got ", temperature);
  if (divergence == DistillDivergence::jsd && !(beta >= 0.0 && beta <= 1.0))
    TS_FAIL("distillation jsd beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got ", beta);
}

DistillMetrics& DistillMetrics::operator+=(const DistillMetrics& o) {
  if (o.tokens) divergence_max = tokens ? std::max(divergence_max, o.divergence_max) : o.divergence_max;
  divergence_sum += o.divergence_sum;
  tokens += o.tokens;
  return *this;
}

int64_t count_distill_tokens(const Tensor& weights) {
  const auto w = weight_values(weights, weights.defined() ? weights.numel() : 0);
  return int64_t(std::count_if(w.begin(), w.end(), [](double x) { return x != 0.0; }));
}

DistillLossResult distill_loss(const Tensor& student_logits, const Tensor& teacher_logits,
                               const Tensor& weights, double normalizer, const DistillConfig& cfg,
                               const Tensor& dstudent) {
  cfg.validate();
  check_host_float(student_logits, "student logits");
  check_host_float(teacher_logits, "teacher logits");
  TS_CHECK(student_logits.ndim() == 2, "student logits must be (N, V), got ", student_logits.str());
  TS_CHECK(teacher_logits.ndim() == 2, "teacher logits must be (N, V), got ", teacher_logits.str());
  const int64_t N = student_logits.size(0), V = student_logits.size(1);
  if (teacher_logits.size(1) != V)
    TS_FAIL("teacher and student must share the vocabulary (the same tokenizer): teacher logits have V = ",
            teacher_logits.size(1), ", student logits V = ", V,
            "; distil from a teacher with the student's tokenizer or re-tokenise the text");
  TS_CHECK(teacher_logits.size(0) == N, "teacher logits ", teacher_logits.str(), " must have the student's ",
           N, " rows");
  TS_CHECK(dstudent.defined() && dstudent.shape() == student_logits.shape() &&
               dstudent.dtype() == student_logits.dtype() && dstudent.device() == Device::cpu &&
               dstudent.is_contiguous(),
           "dstudent must be a contiguous host tensor like the student logits ", student_logits.str());
  const auto w = weight_values(weights, N);
  check_normalizer(normalizer, w);

  // The special cases of TRL's generalized_jsd_loss.
  DistillDivergence mode = cfg.divergence;
  if (mode == DistillDivergence::jsd && cfg.beta == 0.0) mode = DistillDivergence::forward_kl;
  if (mode == DistillDivergence::jsd && cfg.beta == 1.0) mode = DistillDivergence::reverse_kl;
  const double beta = cfg.beta, tau = cfg.temperature;
  const double log_1mb = std::log1p(-beta), log_b = std::log(beta);

  DistillLossResult res;
  std::vector<double> ls(static_cast<size_t>(V)), lt(static_cast<size_t>(V)), g(static_cast<size_t>(V));
  for (int64_t i = 0; i < N; ++i) {
    const double wi = w[size_t(i)];
    if (wi == 0.0) {
      for (int64_t j = 0; j < V; ++j) put(dstudent, i * V + j, 0.0);
      continue;
    }
    log_softmax_any(student_logits, i, tau, ls.data(), "student");
    log_softmax_any(teacher_logits, i, tau, lt.data(), "teacher");
    double D = 0.0;
    const double c = wi / (normalizer * tau);
    switch (mode) {
      case DistillDivergence::reverse_kl: {
        for (int64_t j = 0; j < V; ++j) {
          const double ps = std::exp(ls[size_t(j)]);
          if (ps > 0.0 && lt[size_t(j)] == -std::numeric_limits<double>::infinity())
            TS_FAIL("reverse KL is infinite at row ", i, ", token ", j,
                    ": the teacher's logit is -inf where the student's probability is ", ps);
          g[size_t(j)] = ps > 0.0 ? ls[size_t(j)] - lt[size_t(j)] : 0.0;  // r_j
          D += plogratio(ps, ls[size_t(j)], lt[size_t(j)]);
        }
        for (int64_t j = 0; j < V; ++j) {
          const double ps = std::exp(ls[size_t(j)]);
          put(dstudent, i * V + j, c * (ps > 0.0 ? ps * (g[size_t(j)] - D) : 0.0));
        }
        break;
      }
      case DistillDivergence::forward_kl: {
        for (int64_t j = 0; j < V; ++j) {
          const double pt = std::exp(lt[size_t(j)]);
          if (pt > 0.0 && ls[size_t(j)] == -std::numeric_limits<double>::infinity())
            TS_FAIL("forward KL is infinite at row ", i, ", token ", j,
                    ": the student's logit is -inf where the teacher's probability is ", pt);
          D += plogratio(pt, lt[size_t(j)], ls[size_t(j)]);
          put(dstudent, i * V + j, c * (std::exp(ls[size_t(j)]) - pt));
        }
        break;
      }
      case DistillDivergence::jsd: {
        double gbar = 0.0;
        for (int64_t j = 0; j < V; ++j) {
          const double lsj = ls[size_t(j)], ltj = lt[size_t(j)];
          const double lm = log_add_exp(log_1mb + lsj, log_b + ltj);
          const double ps = std::exp(lsj), pt = std::exp(ltj);
          D += beta * plogratio(pt, ltj, lm) + (1.0 - beta) * plogratio(ps, lsj, lm);
          g[size_t(j)] = ps > 0.0 ? (1.0 - beta) * (lsj - lm) : 0.0;
          gbar += ps * g[size_t(j)];
        }
        for (int64_t j = 0; j < V; ++j) {
          const double ps = std::exp(ls[size_t(j)]);
          put(dstudent, i * V + j, c * (ps > 0.0 ? ps * (g[size_t(j)] - gbar) : 0.0));
        }
        break;
      }
    }
    res.loss += wi * D / normalizer;
    add_metric(res.metrics, D);
  }
  return res;
}

SampledDistillResult sampled_distill_loss(const Tensor& logp_student, const Tensor& logp_teacher,
                                          const Tensor& weights, double normalizer) {
  check_host_float(logp_student, "logp_student");
  check_host_float(logp_teacher, "logp_teacher");
  check_same_shape(logp_student, logp_teacher, "logp_student", "logp_teacher");
  check_same_shape(logp_student, weights, "logp_student", "weights");
  const int64_t n = logp_student.numel();
  const auto w = weight_values(weights, n);
  check_normalizer(normalizer, w);
  SampledDistillResult res;
  res.dlogp = Tensor::empty(logp_student.shape(), logp_student.dtype(), Device::cpu);
  for (int64_t i = 0; i < n; ++i) {
    const double wi = w[size_t(i)];
    if (wi == 0.0) {
      put(res.dlogp, i, 0.0);
      continue;
    }
    const double ls = at(logp_student, i), lt = at(logp_teacher, i);
    TS_CHECK(std::isfinite(ls), "logp_student at flat index ", i, " must be a finite log-probability, got ",
             ls);
    TS_CHECK(std::isfinite(lt), "logp_teacher at flat index ", i, " must be a finite log-probability, got ",
             lt, " (the teacher must be able to emit every token the student sampled)");
    const double adv = -(ls - lt);  // detached
    res.loss += -wi * adv * ls / normalizer;
    put(res.dlogp, i, -wi * adv / normalizer);
    add_metric(res.metrics, ls - lt);
  }
  return res;
}

Tensor sampled_distill_advantages(const Tensor& logp_student, const Tensor& logp_teacher,
                                  const Tensor& weights) {
  check_host_float(logp_student, "logp_student");
  check_host_float(logp_teacher, "logp_teacher");
  check_same_shape(logp_student, logp_teacher, "logp_student", "logp_teacher");
  check_same_shape(logp_student, weights, "logp_student", "weights");
  const auto w = weight_values(weights, logp_student.numel());
  Tensor out = Tensor::empty(logp_student.shape(), logp_student.dtype(), Device::cpu);
  for (int64_t i = 0; i < logp_student.numel(); ++i)
    put(out, i, w[size_t(i)] == 0.0 ? 0.0 : at(logp_teacher, i) - at(logp_student, i));
  return out;
}

}  // namespace tessera::rl
