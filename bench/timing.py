"""Timing shared by the benchmarks: two warm-up calls, then repeated calls for a time budget."""
import statistics
import time


def timeit(fn, budget_s=0.25, min_reps=3, max_reps=200):
    """(median, p10, p90) seconds of fn() over at least min_reps calls and about budget_s."""
    fn()
    fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    pick = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return statistics.median(times), pick(0.1), pick(0.9)
