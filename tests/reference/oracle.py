"""What the PyTorch oracle scripts share: the error measure and a checklist that prints each comparison."""
import numpy as np


def rel_err(ours, theirs):
    """max |ours - theirs| / max |theirs|, in float64."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


class Checks:
    """Collects named comparisons against a tolerance; exit_code() is 0 only if all held."""

    def __init__(self, tol):
        self.tol = tol
        self.failures = []

    def check(self, name, err, tol=None):
        tol = self.tol if tol is None else tol
        ok = err <= tol
        print(f"{'ok' if ok else 'FAIL':4} {name}: max relative error {err:.2e}")
        if not ok:
            self.failures.append(name)

    def fail(self, reason):
        print(f"FAIL {reason}")
        self.failures.append(reason)

    def exit_code(self):
        if self.failures:
            print(f"{len(self.failures)} checks failed: {self.failures}")
            return 1
        print("all checks passed")
        return 0
