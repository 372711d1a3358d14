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


def test_undo_gives_back_the_latest_event():
    clock = FakeClock()
    rl = SlidingWindowLimiter(2, 60, clock)
    assert rl.hit("a")
    clock.t += 10
    assert rl.hit("a") and not rl.hit("a")
    rl.undo("a")  # the slot taken at t+10 is free again...
    assert rl.hit("a") and not rl.hit("a")
    clock.t += 50.01  # ...and the event of t+0 is the one that expires first
    assert rl.hit("a")


def test_undo_of_an_unknown_or_expired_key_is_a_no_op():
    clock = FakeClock()
    rl = SlidingWindowLimiter(1, 1.0, clock)
    rl.undo("nobody")
    rl.hit("a")
    clock.t += 2
    rl.undo("a")
    assert len(rl) == 0 and rl.hit("a")
