// The MPI communicator and the process-group topology, run under mpirun (-np 4 and -np 8 in ctest).
#include "collective_checks.inc"
#include "parallel/mpi_communicator.h"
#include "parallel/topology.h"

namespace tessera {
namespace {

// ---- Topology: pure layout arithmetic ----

struct Degrees {
  int dp, tp, pp, ep;
};
struct Layout {
  const char* name;
  ParallelConfig cfg;
  int world;
  bool valid;
  Degrees want;  // resolved degrees when valid
};

// Layout names list the degrees that are set; dp = -1 (the rest) when DP is not named, and pp = -1 when DP is
// named (so "DP2" on 8 ranks is dp=2 pp=4). Resolved degrees written by hand.
const Layout kLayouts[] = {
    {"DP2", {2, 1, -1, 1}, 4, true, {2, 1, 2, 1}},
    {"TP2", {-1, 2, 1, 1}, 4, true, {2, 2, 1, 1}},
    {"PP2", {-1, 1, 2, 1}, 4, true, {2, 1, 2, 1}},
    {"EP2", {-1, 1, 1, 2}, 4, true, {4, 1, 1, 2}},
    {"EP4", {-1, 1, 1, 4}, 4, true, {4, 1, 1, 4}},
    {"TP2xPP2", {-1, 2, 2, 1}, 4, true, {1, 2, 2, 1}},
    {"DP2xEP2", {2, 1, -1, 2}, 4, true, {2, 1, 2, 2}},
    {"TP2xPP2xEP2", {-1, 2, 2, 2}, 4, true, {1, 2, 2, 2}},
    {"DP2xTP2xPP2", {2, 2, 2, 1}, 4, false, {}},
    {"DP2", {2, 1, -1, 1}, 8, true, {2, 1, 4, 1}},
    {"TP2", {-1, 2, 1, 1}, 8, true, {4, 2, 1, 1}},
    {"PP2", {-1, 1, 2, 1}, 8, true, {4, 1, 2, 1}},
    {"EP2", {-1, 1, 1, 2}, 8, true, {8, 1, 1, 2}},
    {"EP4", {-1, 1, 1, 4}, 8, true, {8, 1, 1, 4}},
    {"TP2xPP2", {-1, 2, 2, 1}, 8, true, {2, 2, 2, 1}},
    {"DP2xEP2", {2, 1, -1, 2}, 8, true, {2, 1, 4, 2}},
    {"TP2xPP2xEP2", {-1, 2, 2, 2}, 8, true, {2, 2, 2, 2}},
    {"DP2xTP2xPP2", {2, 2, 2, 1}, 8, true, {2, 2, 2, 1}},
};

using Groups = std::vector<int>;

// Checks that a group function partitions the world into groups of `size`, each listing itself for every
// member, with member k at coordinate k.
void check_partition(const Topology& t, const char* what, int size, Groups (Topology::*group)(int) const,
                     int RankCoords::*coord) {
  for (int r = 0; r < t.world_size(); ++r) {
    Groups g = (t.*group)(r);
    ASSERT_EQ(int(g.size()), size) << t.str() << " " << what << " group of rank " << r;
    EXPECT_TRUE(std::is_sorted(g.begin(), g.end())) << t.str() << " " << what;
    EXPECT_NE(std::find(g.begin(), g.end(), r), g.end()) << t.str() << " " << what << " group lacks rank " << r;
    for (int k = 0; k < size; ++k) {
      EXPECT_EQ((t.*group)(g[k]), g) << t.str() << " " << what << ": rank " << g[k] << " disagrees about its group";
      EXPECT_EQ(t.coords(g[k]).*coord, k) << t.str() << " " << what << ": member " << k;
    }
  }
}

// Non-blocking sends on channels (MPI): every rank first sends 4 MB to the next rank on channel 1 and then on
// channel 0 (two blocking sends of that size facing each other round the ring would not complete), then receives
// channel 0 before channel 1 (the channels are independent), then waits for its sends.
TEST(Collectives, NonBlockingSendsOnChannels) {
  COMM_OR_SKIP();
  if (N < 2) GTEST_SKIP() << "isend needs two ranks";
  const int next = (R + 1) % N, prev = (R + N - 1) % N;
  const int64_t n = 1 << 20;
  auto f = [](int from, int channel, int64_t i) { return float(from * 7 + channel * 1000 + i % 1000); };
  Tensor a = filled({n}, DType::f32, [&](int64_t i) { return double(f(R, 1, i)); });
  Tensor b = filled({n}, DType::f32, [&](int64_t i) { return double(f(R, 0, i)); });
  comm.reset_stats();
  comm.isend(a, next, 1);
  comm.isend(b, next, 0);
  for (int channel : {0, 1}) {
    Tensor in = filled({n}, DType::f32, [](int64_t) { return 0.0; });
    comm.recv_on(in, prev, channel);
    std::vector<double> got = values(in);
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) wrong += got[i] != double(f(prev, channel, i));
    EXPECT_EQ(wrong, 0) << "channel " << channel;
  }
  comm.wait_sends();
  EXPECT_EQ(comm.stats().send.bytes, 8 * n);
  EXPECT_EQ(comm.stats().recv.bytes, 8 * n);
}

TEST(Topology, LayoutsOn4And8Ranks) {
  for (const Layout& l : kLayouts) {
    SCOPED_TRACE(cat(l.name, " on ", l.world, " ranks"));
    if (!l.valid) {
      EXPECT_THROW(Topology::make(l.cfg, l.world), Error);
      continue;
    }
    Topology t = Topology::make(l.cfg, l.world);
    EXPECT_EQ(t.dp(), l.want.dp);
    EXPECT_EQ(t.tp(), l.want.tp);
    EXPECT_EQ(t.pp(), l.want.pp);
    EXPECT_EQ(t.ep(), l.want.ep);
    EXPECT_EQ(t.edp(), l.want.dp * l.want.tp / l.want.ep);
    for (int r = 0; r < l.world; ++r) {
      RankCoords c = t.coords(r);
      EXPECT_EQ(t.rank_of(c.dp, c.tp, c.pp), r);
      // tp fastest, then dp, then pp.
      EXPECT_EQ(c.tp, r % t.tp());
      EXPECT_EQ(c.pp, r / (t.tp() * t.dp()));
    }
    check_partition(t, "dp", t.dp(), &Topology::dp_group, &RankCoords::dp);
    check_partition(t, "tp", t.tp(), &Topology::tp_group, &RankCoords::tp);
    check_partition(t, "pp", t.pp(), &Topology::pp_group, &RankCoords::pp);
    check_partition(t, "ep", t.ep(), &Topology::ep_group, &RankCoords::ep);
    check_partition(t, "edp", t.edp(), &Topology::edp_group, &RankCoords::edp);
    // EP groups are consecutive blocks of one stage; EDP members hold the same experts (same ep coordinate).
    for (int r = 0; r < l.world; ++r) {
      Groups e = t.ep_group(r);
      EXPECT_EQ(e.back() - e.front(), t.ep() - 1);
      for (int m : e) EXPECT_EQ(t.coords(m).pp, t.coords(r).pp);
      for (int m : t.edp_group(r)) {
        EXPECT_EQ(t.coords(m).ep, t.coords(r).ep);
        EXPECT_EQ(t.coords(m).pp, t.coords(r).pp);
      }
    }
  }
}

struct RankRow {
  RankCoords c;
  Groups dp, tp, pp, ep, edp;
};

void check_table(const Topology& t, const std::vector<RankRow>& table) {
  ASSERT_EQ(int(table.size()), t.world_size());
  for (int r = 0; r < t.world_size(); ++r) {
    SCOPED_TRACE(cat(t.str(), " rank ", r));
    const RankRow& w = table[r];
    RankCoords c = t.coords(r);
    EXPECT_EQ(c.dp, w.c.dp);
    EXPECT_EQ(c.tp, w.c.tp);
    EXPECT_EQ(c.pp, w.c.pp);
    EXPECT_EQ(c.ep, w.c.ep);
    EXPECT_EQ(c.edp, w.c.edp);
    EXPECT_EQ(t.dp_group(r), w.dp);
    EXPECT_EQ(t.tp_group(r), w.tp);
    EXPECT_EQ(t.pp_group(r), w.pp);
    EXPECT_EQ(t.ep_group(r), w.ep);
    EXPECT_EQ(t.edp_group(r), w.edp);
  }
}

TEST(Topology, HandWrittenTableTp2Pp2Ep2On8) {
  // dp=2 tp=2 pp=2 ep=2: rank = tp + 2 * (dp + 2 * pp); stage 0 = ranks 0-3, stage 1 = 4-7.
  //                 {dp tp pp ep edp}   dp group  tp group  pp group  ep group  edp group
  std::vector<RankRow> table = {
      {{0, 0, 0, 0, 0}, {0, 2}, {0, 1}, {0, 4}, {0, 1}, {0, 2}},
      {{0, 1, 0, 1, 0}, {1, 3}, {0, 1}, {1, 5}, {0, 1}, {1, 3}},
      {{1, 0, 0, 0, 1}, {0, 2}, {2, 3}, {2, 6}, {2, 3}, {0, 2}},
      {{1, 1, 0, 1, 1}, {1, 3}, {2, 3}, {3, 7}, {2, 3}, {1, 3}},
      {{0, 0, 1, 0, 0}, {4, 6}, {4, 5}, {0, 4}, {4, 5}, {4, 6}},
      {{0, 1, 1, 1, 0}, {5, 7}, {4, 5}, {1, 5}, {4, 5}, {5, 7}},
      {{1, 0, 1, 0, 1}, {4, 6}, {6, 7}, {2, 6}, {6, 7}, {4, 6}},
      {{1, 1, 1, 1, 1}, {5, 7}, {6, 7}, {3, 7}, {6, 7}, {5, 7}},
  };
  check_table(Topology::make({-1, 2, 2, 2}, 8), table);
}

TEST(Topology, HandWrittenTableEp4On8) {
  // dp=8 ep=4: two EP groups {0-3} {4-7}; ranks 0 and 4 hold the same experts, and so on.
  std::vector<RankRow> table;
  const Groups all = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int r = 0; r < 8; ++r) {
    Groups ep = r < 4 ? Groups{0, 1, 2, 3} : Groups{4, 5, 6, 7};
    table.push_back({{r, 0, 0, r % 4, r / 4}, all, {r}, {r}, ep, {r % 4, r % 4 + 4}});
  }
  check_table(Topology::make({-1, 1, 1, 4}, 8), table);
}

TEST(Topology, HandWrittenTableDp2Ep2Pp2On4) {
  // dp=2 pp=2 ep=2 on 4 ranks: rank = dp + 2 * pp.
  std::vector<RankRow> table = {
      {{0, 0, 0, 0, 0}, {0, 1}, {0}, {0, 2}, {0, 1}, {0}},
      {{1, 0, 0, 1, 0}, {0, 1}, {1}, {1, 3}, {0, 1}, {1}},
      {{0, 0, 1, 0, 0}, {2, 3}, {2}, {0, 2}, {2, 3}, {2}},
      {{1, 0, 1, 1, 0}, {2, 3}, {3}, {1, 3}, {2, 3}, {3}},
  };
  check_table(Topology::make({2, 1, -1, 2}, 4), table);
}

void expect_config_error(const ParallelConfig& cfg, int world, const std::vector<std::string>& parts) {
  try {
    Topology::make(cfg, world);
    ADD_FAILURE() << "no error for dp=" << cfg.dp << " tp=" << cfg.tp << " pp=" << cfg.pp << " ep=" << cfg.ep;
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find(cat("world size ", world)), std::string::npos) << what;
    for (const std::string& p : parts) EXPECT_NE(what.find(p), std::string::npos) << "missing '" << p << "' in: " << what;
  }
}

TEST(Topology, InvalidConfigsNameTheFieldsAndTheWorldSize) {
  expect_config_error({3, 2, 1, 1}, 4, {"dp*tp*pp = 3*2*1 = 6 does not equal the world size 4"});
  expect_config_error({2, 2, 2, 1}, 4, {"dp*tp*pp = 2*2*2 = 8"});
  expect_config_error({-1, -1, 1, 1}, 8, {"both dp and tp are -1"});
  expect_config_error({-1, 3, 1, 1}, 8, {"tp*pp = 3 does not divide the world size 8", "dp = -1"});
  expect_config_error({2, -1, 3, 1}, 8, {"dp*pp = 6 does not divide"});
  expect_config_error({-1, 1, 1, 3}, 4, {"ep=3 does not divide dp*tp = 4*1 = 4"});
  expect_config_error({2, 2, -1, 3}, 8, {"ep=3 does not divide dp*tp = 2*2 = 4"});
  expect_config_error({-1, 0, 1, 1}, 4, {"tp=0 must be a positive degree or -1"});
  expect_config_error({-1, 1, -2, 1}, 4, {"pp=-2"});
  expect_config_error({-1, 1, 1, 1}, 0, {"at least 1"});
}

// ---- Topology over the real world communicator ----

TEST(Topology, ProcessGroupsMatchTheLayout) {
  Communicator& world = *env().world;
  const int n = world.size();
  int built = 0;
  for (const Layout& l : kLayouts) {
    if (!l.valid || l.world != n) continue;
    SCOPED_TRACE(cat(l.name, " on ", n, " ranks"));
    Topology t = Topology::make(l.cfg, n);
    ProcessGroups g = ProcessGroups::build(t, world);
    ++built;
    EXPECT_EQ(g.rank, world.rank());
    struct Check {
      const char* name;
      Communicator* comm;
      Groups want;
      int coord;
    } checks[] = {{"dp", g.dp.get(), t.dp_group(g.rank), g.coords.dp},
                  {"tp", g.tp.get(), t.tp_group(g.rank), g.coords.tp},
                  {"pp", g.pp.get(), t.pp_group(g.rank), g.coords.pp},
                  {"ep", g.ep.get(), t.ep_group(g.rank), g.coords.ep},
                  {"edp", g.edp.get(), t.edp_group(g.rank), g.coords.edp}};
    for (const Check& c : checks) {
      ASSERT_NE(c.comm, nullptr) << c.name;
      EXPECT_EQ(c.comm->size(), int(c.want.size())) << c.name;
      EXPECT_EQ(c.comm->rank(), c.coord) << c.name;
      // The members, as the communicator sees them.
      Tensor me = Tensor::zeros({1}, DType::i64, Device::cpu);
      me.data<int64_t>()[0] = g.rank;
      Tensor all = Tensor::zeros({c.comm->size()}, DType::i64, Device::cpu);
      c.comm->all_gather(me, all);
      Groups got(all.data<int64_t>(), all.data<int64_t>() + all.numel());
      EXPECT_EQ(got, c.want) << c.name;
    }
  }
  EXPECT_GT(built, 0) << "no layout for world size " << n;
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  tessera::MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rc = 0;
  {
    std::unique_ptr<tessera::Communicator> world = tessera::make_mpi_world();
    tessera::env().world = world.get();
    tessera::env().device = tessera::Device::cpu;
    tessera::env().exact = true;
    tessera::env().cross_rank_checks = true;
    rc = tessera::run_tests_on_all_ranks();
    tessera::env().world = nullptr;
  }
  return rc;
}
