"""The sliding-window limiter used for sign-in throttling and message rates."""
from argus.ratelimit import SlidingWindowLimiter


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_allows_limit_events_then_refuses_until_the_window_slides():
    clock = FakeClock()
    rl = SlidingWindowLimiter(3, 60, clock)
    assert [rl.hit("a") for _ in range(4)] == [True, True, True, False]
    assert 59 < rl.retry_after("a") <= 60
    assert rl.hit("b")  # keys are independent
    clock.t += 60.01
    assert rl.hit("a") and rl.retry_after("a") == 0.0


def test_reset_forgets_a_key():
    rl = SlidingWindowLimiter(1, 60, FakeClock())
    rl.hit("a")
    assert rl.blocked("a")
    rl.reset("a")
    assert not rl.blocked("a")


def test_expired_keys_are_swept_so_memory_stays_bounded():
    clock = FakeClock()
    rl = SlidingWindowLimiter(5, 1.0, clock)
    for i in range(5000):
        rl.hit(f"client-{i}")
        clock.t += 0.01
    assert len(rl) < 200 + SlidingWindowLimiter.SWEEP_EVERY
