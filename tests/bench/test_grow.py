"""bench.grow's measurement: where a grown arm's final bits per byte, against its
FLOPs over the budgets, reaches the scratch run's (and when it is only a bound)."""
from mmrec_jax.bench import grow


def test_the_crossing_interpolates_between_budgets_and_says_when_it_is_a_bound():
  pts = [(200.0, 1.30), (100.0, 1.50)]   # (FLOPs, final bpb), any order
  f, how = grow.crossing(pts, 1.40)
  assert abs(f - 150.0) < 1e-9 and how == "="
  assert grow.crossing(pts, 1.60) == (100.0, "<=")   # the smallest budget already reaches it
  assert grow.crossing(pts, 1.20) == (200.0, ">")    # the largest does not
  assert grow.BOUND["<="] == ">=" and grow.BOUND[">"] == "<"
