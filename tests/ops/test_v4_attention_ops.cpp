// STUB: to be written. Gradient checks (fp64 finite differences, fp32 vs fp64) and property tests of the V4 attention ops.
#include <gtest/gtest.h>

#include "ops/v4_ops.h"
#include "op_harness.h"
