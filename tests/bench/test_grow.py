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


def test_the_summary_gives_each_arm_and_the_small_model_alone_per_seed_mean_and_spread():
  def arm(s, wo, bound="="):
    return {"saving": s, "saving_without_small": wo, "bound": bound}
  results = {
      0: {"points": {"0.35": {"carry": arm(0.5, 0.8)}},
          "small_alone": {"saving": 0.7, "bound": "="}},
      1: {"points": {"0.35": {"carry": arm(0.3, 0.6, ">")}},
          "small_alone": {"saving": 0.6, "bound": "<="}},
  }
  points, alone = grow.summary(results, ["0.35"], ["carry"])
  carry = points["0.35"]["carry"]
  assert carry["saving"]["per_seed"] == {0: 0.5, 1: 0.3}
  assert abs(carry["saving"]["mean"] - 0.4) < 1e-9
  assert abs(carry["saving"]["spread"] - 0.1) < 1e-9          # population std
  assert abs(carry["saving_without_small"]["mean"] - 0.7) < 1e-9
  assert carry["bound"] == {0: "", 1: "<"}                      # the largest budget fell short
  assert abs(alone["saving"]["mean"] - 0.65) < 1e-9 and alone["bound"] == {0: "", 1: ">="}
  del results[1]["small_alone"]                                 # not run: no reference
  assert grow.summary(results, ["0.35"], ["carry"])[1] is None


def test_a_grown_runs_curve_counts_flops_from_the_small_run_and_its_own_steps():
  val = [{"step": 110, "bits_per_byte": 2.0}, {"step": 130, "bits_per_byte": 1.9}]
  # grown at step 100 after 500 FLOPs of the small run, 10 FLOPs per big-model step
  assert grow.curve(val, 10.0, 500.0, 100) == [(600.0, 2.0), (800.0, 1.9)]
  assert grow.curve(val[:1], 3.0) == [(330.0, 2.0)]
