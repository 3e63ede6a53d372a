"""The launcher's restart backoff (specdec.tools.cluster.Supervisor): as compose's restart policy,
each exit in a row waits twice as long, up to a cap, and a child that stayed up starts over."""

from specdec.tools.cluster import Supervisor


def exit_and_restart(s: Supervisor, now: float) -> float:
    """The wait before a child that exits at ``now`` is started again."""
    due = s.exited("draft-0", now)
    assert s.exited("draft-0", now + 0.1) == due  # asking again does not push it back
    s.restarted("draft-0", due)
    return due - now


def test_backoff_doubles_up_to_the_cap():
    s = Supervisor(base_s=1.0, max_s=5.0, stable_s=60.0)
    assert [exit_and_restart(s, t) for t in (0.0, 2.0, 6.0, 12.0, 20.0)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert s.restarts == {"draft-0": 5}


def test_a_child_that_stays_up_starts_over():
    s = Supervisor(base_s=1.0, max_s=30.0, stable_s=60.0)
    exit_and_restart(s, 0.0)
    exit_and_restart(s, 2.0)
    s.running("draft-0", 10.0)
    s.running("draft-0", 80.0)  # up for 77 s since its restart at 3 s
    assert exit_and_restart(s, 81.0) == 1.0


def test_each_exit_is_announced_once():
    s = Supervisor()
    s.exited("verify", 0.0)
    assert s.announce("verify") and not s.announce("verify")
    s.restarted("verify", 1.0)
    s.exited("verify", 2.0)
    assert s.announce("verify")
