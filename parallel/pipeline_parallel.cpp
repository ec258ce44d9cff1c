#include "parallel/pipeline_parallel.h"

#include <algorithm>
#include <limits>
#include <map>
#include <string>
#include <utility>

#include "core/error.h"
#include "model/model.h"
#include "ops/ops.h"

namespace tessera {

std::vector<int64_t> balance_pipeline_stages(const std::vector<double>& cost, int P) {
  const int64_t L = int64_t(cost.size());
  TS_CHECK(P >= 1 && P <= L, "pipeline parallelism: parallel.pp (", P, ") must not exceed model.n_layers (", L,
           "): each stage holds at least one layer");
  std::vector<double> prefix(L + 1, 0.0);
  for (int64_t l = 0; l < L; ++l) prefix[l + 1] = prefix[l] + cost[l];
  // best[k][i]: over the splits of the first i layers into k stages, the smallest (costliest stage, sum of squared
  // stage costs), compared in that order; from[k][i]: where its last stage starts.
  using Score = std::pair<double, double>;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<Score>> best(P + 1, std::vector<Score>(L + 1, {inf, inf}));
  std::vector<std::vector<int64_t>> from(P + 1, std::vector<int64_t>(L + 1, 0));
  best[0][0] = {0, 0};
  for (int k = 1; k <= P; ++k)
    for (int64_t i = k; i <= L; ++i)
      for (int64_t j = k - 1; j < i; ++j) {
        const double c = prefix[i] - prefix[j];
        const Score s{std::max(best[k - 1][j].first, c), best[k - 1][j].second + c * c};
        if (s < best[k][i]) best[k][i] = s, from[k][i] = j;
      }
  std::vector<int64_t> layers(P);
  for (int64_t k = P, end = L; k >= 1; end = from[k][end], --k) layers[k - 1] = end - from[k][end];
  return layers;
}

OneFOneB::OneFOneB(PipelineStageModel& model, Communicator& pp, const std::vector<TokenBatch>& micro, int64_t lo,
                   int64_t hi, double loss_scale, std::function<void(int64_t)> on_forward)
    : model_(model),
      pp_(pp),
      micro_(micro),
      loss_scale_(loss_scale),
      on_forward_(std::move(on_forward)),
      stage_(pp.rank()),
      n_stages_(pp.size()) {
  TS_CHECK(model.pipeline_stages() == pp.size() && model.pipeline_stage() == pp.rank(),
           "OneFOneB: the model is stage ", model.pipeline_stage(), " of ", model.pipeline_stages(),
           ", the pp group has this rank at ", pp.rank(), " of ", pp.size());
  TS_CHECK(lo < hi && hi <= int64_t(micro.size()), "OneFOneB: micro-batches [", lo, ", ", hi, ")");
  const int64_t n = hi - lo, warmup = std::min<int64_t>(n_stages_ - 1 - stage_, n);
  for (int64_t j = 0; j < warmup; ++j) ops_.push_back({true, lo + j});
  steady_begin_ = int64_t(ops_.size());
  for (int64_t i = 0; i < n - warmup; ++i) {
    ops_.push_back({true, lo + warmup + i});
    ops_.push_back({false, lo + i});
  }
  steady_end_ = int64_t(ops_.size());
  for (int64_t j = n - warmup; j < n; ++j) ops_.push_back({false, lo + j});
}

Tensor OneFOneB::activation() const {
  return Tensor::empty({micro_.front().ids.numel(), model_.activation_width()}, DType::f32);
}

void OneFOneB::run_through_backward(int64_t m) {
  while (next_ < ops_.size()) {
    const int64_t k = int64_t(next_++);
    const Op op = ops_[size_t(k)];
    const bool steady = k >= steady_begin_ && k < steady_end_;
    if (op.forward) {
      forward(op.m, steady);
    } else {
      backward(op.m, steady, k + 1 == steady_end_);
      if (op.m == m) return;
    }
  }
  TS_FAIL("OneFOneB: micro-batch ", m, " is not in the schedule (or its backward already ran)");
}

void OneFOneB::forward(int64_t m, bool steady) {
  const bool first = stage_ == 0, last = stage_ == n_stages_ - 1;
  // The input: received now (warm-up, and the first forward of the steady phase) or with the last backward's send.
  Tensor input;
  if (!first) {
    if (input_.defined()) {
      input = std::exchange(input_, Tensor());
    } else {
      input = activation();
      pp_.recv(input, stage_ - 1);
    }
  }
  Tensor out = last ? Tensor() : activation();
  loss_sum_ += model_.stage_forward(m, micro_[m], input, out, loss_scale_);
  if (on_forward_) on_forward_(m);
  if (last) return;
  if (steady) {  // send on, and receive the gradient for the backward that follows
    dy_ = activation();
    pp_.send_recv(out, stage_ + 1, dy_, stage_ + 1);
  } else {
    pp_.send(out, stage_ + 1);
  }
}

void OneFOneB::backward(int64_t m, bool steady, bool last_steady) {
  const bool first = stage_ == 0, last = stage_ == n_stages_ - 1;
  Tensor dy;
  if (!last) {
    if (dy_.defined()) {
      dy = std::exchange(dy_, Tensor());
    } else {
      dy = activation();
      pp_.recv(dy, stage_ + 1);
    }
  }
  Tensor dx = first ? Tensor() : activation();
  model_.stage_backward(m, micro_[m], dy, dx);
  if (first) return;
  if (steady && !last_steady) {  // send the gradient back and receive the next forward's input
    input_ = activation();
    pp_.send_recv(dx, stage_ - 1, input_, stage_ - 1);
  } else {
    pp_.send(dx, stage_ - 1);
  }
}

double pipeline_forward_loss(PipelineStageModel& model, Communicator& pp, const TokenBatch& batch) {
  const int stage = pp.rank(), n = pp.size();
  const Shape shape{batch.ids.numel(), model.activation_width()};
  Tensor input, out;
  if (stage > 0) {
    input = Tensor::empty(shape, DType::f32);
    pp.recv(input, stage - 1);
  }
  if (stage < n - 1) out = Tensor::empty(shape, DType::f32);
  const double loss = model.stage_forward(-1, batch, input, out, 0.0);
  if (stage < n - 1) pp.send(out, stage + 1);
  Tensor t = Tensor::empty({1}, DType::f64, Device::cpu);
  t.data<double>()[0] = stage == n - 1 ? loss : 0.0;
  pp.all_reduce(t, ReduceOp::sum);  // the last stage's loss plus zeros: exact
  return t.data<double>()[0];
}

// ---- checkpoint gathering: each stage sends its tensors' names, shapes and dtypes as one i64 header, then the
// tensors.
namespace {

void append_entry(std::vector<int64_t>& h, const std::string& name, const Tensor& t) {
  h.push_back(int64_t(name.size()));
  for (char c : name) h.push_back(int64_t(static_cast<unsigned char>(c)));
  h.push_back(int64_t(t.dtype()));
  h.push_back(t.ndim());
  for (int64_t d : t.shape()) h.push_back(d);
}

struct Entry {
  std::string name;
  DType dtype;
  Shape shape;
};

std::vector<Entry> parse_entries(const int64_t* h, int64_t n) {
  std::vector<Entry> out;
  int64_t at = 0;
  while (at < n) {
    Entry e;
    const int64_t len = h[at++];
    for (int64_t i = 0; i < len; ++i) e.name += char(h[at++]);
    e.dtype = DType(h[at++]);
    const int64_t nd = h[at++];
    for (int64_t i = 0; i < nd; ++i) e.shape.push_back(h[at++]);
    out.push_back(std::move(e));
  }
  return out;
}

}  // namespace

PipelineGathered gather_pipeline_stages(const ParamList& saved, const std::vector<Optimizer::State>& state,
                                        Communicator& pp, std::deque<Param>& storage) {
  PipelineGathered out;
  // Every entry: parameters first ("P" + name), then optimizer state ("S" + key).
  std::vector<std::pair<std::string, Tensor>> mine;
  std::map<std::string, const Param*> by_name;
  for (const Param* p : saved) mine.emplace_back("P" + p->name, p->value), by_name[p->name] = p;
  for (const Optimizer::State& s : state) mine.emplace_back("S" + s.key, s.tensor);
  if (pp.rank() != 0) {
    std::vector<int64_t> h;
    for (const auto& [name, t] : mine) append_entry(h, name, t);
    Tensor len = Tensor::empty({1}, DType::i64, Device::cpu);
    len.data<int64_t>()[0] = int64_t(h.size());
    pp.send(len, 0);
    Tensor header = Tensor::empty({int64_t(h.size())}, DType::i64, Device::cpu);
    std::copy(h.begin(), h.end(), header.data<int64_t>());
    pp.send(header, 0);
    for (const auto& [name, t] : mine) pp.send(t.device() == Device::cpu ? t : t.to_device(Device::cpu), 0);
    return out;
  }
  auto take = [&](const std::string& name, const Tensor& t, const Param* like) {
    if (name[0] == 'P') {
      if (like) {
        out.params.push_back(const_cast<Param*>(like));
        return;
      }
      Param p;
      p.name = name.substr(1);
      p.kind = ParamKind::matrix;  // the checkpoint stores values only
      p.value = t;
      storage.push_back(std::move(p));
      out.params.push_back(&storage.back());
    } else {
      out.state.push_back({name.substr(1), t});
    }
  };
  for (const auto& [name, t] : mine) take(name, t, name[0] == 'P' ? by_name.at(name.substr(1)) : nullptr);
  for (int s = 1; s < pp.size(); ++s) {
    Tensor len = Tensor::empty({1}, DType::i64, Device::cpu);
    pp.recv(len, s);
    Tensor header = Tensor::empty({len.data<int64_t>()[0]}, DType::i64, Device::cpu);
    pp.recv(header, s);
    for (const Entry& e : parse_entries(header.data<int64_t>(), header.numel())) {
      Tensor t = Tensor::empty(e.shape, e.dtype, Device::cpu);
      pp.recv(t, s);
      take(e.name, t, nullptr);
    }
  }
  return out;
}

}  // namespace tessera

namespace tessera {

// ---- interleaved 1F1B

InterleavedStages::InterleavedStages(std::vector<std::unique_ptr<Model>> chunks) : chunks_(std::move(chunks)) {
  TS_CHECK(!chunks_.empty(), "InterleavedStages: no chunks");
  for (const auto& c : chunks_)
    TS_CHECK(dynamic_cast<PipelineStageModel*>(c.get()), "InterleavedStages: a chunk is not a pipeline stage model");
}

ParamList InterleavedStages::params() {
  ParamList out;
  for (auto& c : chunks_)
    for (Param* p : c->params()) out.push_back(p);
  return out;
}

ParamList InterleavedStages::buffers() {
  ParamList out;
  for (auto& c : chunks_)
    for (Param* p : c->buffers()) out.push_back(p);
  return out;
}

void InterleavedStages::init(uint64_t seed) {
  for (auto& c : chunks_) c->init(seed);
}

std::vector<Tensor> InterleavedStages::gradient_accumulators() {
  std::vector<Tensor> out;
  for (auto& c : chunks_)
    for (const Tensor& t : c->gradient_accumulators()) out.push_back(t);
  return out;
}

void InterleavedStages::finish_gradients() {
  for (auto& c : chunks_) c->finish_gradients();
}

std::vector<size_t> InterleavedStages::chunk_sizes() {
  std::vector<size_t> out;
  for (auto& c : chunks_) out.push_back(c->params().size());
  return out;
}

double InterleavedStages::forward(const TokenBatch&, Tensor*) {
  TS_FAIL("InterleavedStages: a forward runs through the pipeline (interleaved_forward_loss)");
}
double InterleavedStages::forward_backward(const TokenBatch&, double) {
  TS_FAIL("InterleavedStages: training runs the interleaved schedule (InterleavedOneFOneB)");
}
double InterleavedStages::forward_backward_logits(const TokenBatch&, const LogitsGrad&) {
  TS_FAIL("InterleavedStages: not with a loss on the logits");
}

namespace {
constexpr int kForwardChannel = 0, kBackwardChannel = 1;
}  // namespace

InterleavedOneFOneB::InterleavedOneFOneB(InterleavedStages& model, Communicator& pp, const std::vector<TokenBatch>& micro,
                                         int64_t lo, int64_t hi, double loss_scale)
    : model_(model),
      pp_(pp),
      micro_(micro),
      lo_(lo),
      n_(hi - lo),
      loss_scale_(loss_scale),
      rank_(pp.rank()),
      P_(pp.size()),
      V_(int(model.n_chunks())) {
  TS_CHECK(lo < hi && hi <= int64_t(micro.size()), "InterleavedOneFOneB: micro-batches [", lo, ", ", hi, ")");
  TS_CHECK(n_ % P_ == 0, "interleaved 1F1B: the micro-batches per data-parallel rank (", n_,
           ") must be a multiple of parallel.pp (", P_, ")");
  stacks_.resize(size_t(V_));  // before the trees refer to them
  for (int c = 0; c < V_; ++c) {
    PipelineStageModel& s = model.stage(size_t(c));
    TS_CHECK(s.pipeline_stage() == c * P_ + rank_ && s.pipeline_stages() == P_ * V_, "InterleavedOneFOneB: chunk ",
             c, " is virtual stage ", s.pipeline_stage(), " of ", s.pipeline_stages(), ", expected ", c * P_ + rank_,
             " of ", P_ * V_);
    trees_.emplace_back(model.chunk(size_t(c)).gradient_accumulators(), lo, hi, stacks_[size_t(c)]);
  }
}

Tensor InterleavedOneFOneB::activation() const {
  return Tensor::empty({micro_.front().ids.numel(), model_.stage(0).activation_width()}, DType::f32);
}

void InterleavedOneFOneB::run() {
  const int64_t total = n_ * V_;
  const int64_t warmup = std::min<int64_t>(int64_t(P_ - 1 - rank_) * 2 + int64_t(V_ - 1) * P_, total);
  for (int64_t k = 0; k < warmup; ++k) forward(k);
  for (int64_t i = 0; i < total - warmup; ++i) {
    forward(warmup + i);
    backward(i);
  }
  for (int64_t k = total - warmup; k < total; ++k) backward(k);
  pp_.wait_sends();
  model_.finish_gradients();
}

void InterleavedOneFOneB::forward(int64_t k) {
  const int c = int((k / P_) % V_);
  const int64_t m = lo_ + (k / (int64_t(P_) * V_)) * P_ + k % P_;
  const int v = c * P_ + rank_;
  const bool first = v == 0, last = v == P_ * V_ - 1;
  Tensor input;
  if (!first) {
    input = activation();
    pp_.recv_on(input, (rank_ - 1 + P_) % P_, kForwardChannel);
  }
  Tensor out = last ? Tensor() : activation();
  loss_sum_ += model_.stage(size_t(c)).stage_forward(m, micro_[size_t(m)], input, out, loss_scale_);
  if (!last) pp_.isend(out, (rank_ + 1) % P_, kForwardChannel);
}

void InterleavedOneFOneB::backward(int64_t k) {
  const int c = V_ - 1 - int((k / P_) % V_);
  const int64_t m = lo_ + (k / (int64_t(P_) * V_)) * P_ + k % P_;
  const int v = c * P_ + rank_;
  const bool first = v == 0, last = v == P_ * V_ - 1;
  Tensor dy;
  if (!last) {
    dy = activation();
    pp_.recv_on(dy, (rank_ + 1) % P_, kBackwardChannel);
  }
  Tensor dx = first ? Tensor() : activation();
  trees_[size_t(c)].begin_leaf(m);
  model_.stage(size_t(c)).stage_backward(m, micro_[size_t(m)], dy, dx);
  trees_[size_t(c)].end_leaf();
  if (!first) pp_.isend(dx, (rank_ - 1 + P_) % P_, kBackwardChannel);
}

double interleaved_forward_loss(InterleavedStages& model, Communicator& pp, const TokenBatch& batch) {
  const int rank = pp.rank(), P = pp.size(), V = int(model.n_chunks());
  const Shape shape{batch.ids.numel(), model.stage(0).activation_width()};
  double loss = 0;
  for (int c = 0; c < V; ++c) {  // the virtual stages in order: each rank's chunk c waits for the previous rank's
    const int v = c * P + rank;
    Tensor input, out;
    if (v > 0) {
      input = Tensor::empty(shape, DType::f32);
      pp.recv(input, (rank - 1 + P) % P);
    }
    if (v < P * V - 1) out = Tensor::empty(shape, DType::f32);
    loss += model.stage(size_t(c)).stage_forward(-1, batch, input, out, 0.0);
    if (v < P * V - 1) pp.send(out, (rank + 1) % P);
  }
  Tensor t = Tensor::empty({1}, DType::f64, Device::cpu);
  t.data<double>()[0] = loss;  // the last virtual stage's, zeros elsewhere: exact
  pp.all_reduce(t, ReduceOp::sum);
  return t.data<double>()[0];
}

}  // namespace tessera
