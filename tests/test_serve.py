"""`smollm.serve.MainThread`: the server's answers are generated on the thread that runs its loop
(the main thread, whose OpenMP team is the only one: docs/benchmarks.md, section 16). The server
itself is tested through its clients: tests/test_judge.py (the real model) and tests/test_compiled.py."""
from __future__ import annotations

import threading

import pytest

from smollm.serve import MainThread


def test_jobs_from_other_threads_run_on_the_looping_thread_in_order():
    runner, ran = MainThread(), []

    def job(i):
        def work():
            ran.append((i, threading.current_thread()))
            if i == 2:
                raise KeyboardInterrupt  # what Ctrl-C does to the loop: it ends
        return work

    senders = [threading.Thread(target=runner, args=(job(i),)) for i in range(3)]
    for t in senders:  # one after the other, so that the order is known
        t.start()
        t.join()
    with pytest.raises(KeyboardInterrupt):
        runner.loop()
    assert [i for i, _ in ran] == [0, 1, 2]
    assert all(thread is threading.current_thread() for _, thread in ran)
