"""GRPO rewards: math_answer and format on tables of answers, code_exec on right, wrong and hostile code."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from flywheel.errors import FlywheelError
from flywheel.posttrain import sandbox
from flywheel.posttrain.rewards import (
    code_exec,
    completion_text,
    extract_code,
    format_reward,
    make_code_exec,
    math_answer,
    resolve_reward,
    split_tests,
)
from flywheel.posttrain.sandbox import Limits, run_tests

from .conftest import capability_missing


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# (completion, reference answer, expected reward)
MATH_TABLE = [
    ("12 + 30 = 42\n#### 42", "42", 1.0),
    ("#### 42", 42, 1.0),
    ("#### 42.0", "42", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("#### $5", "5", 1.0),
    ("#### -7", "-7", 1.0),
    ("#### 0.5", "1/2", 1.0),
    ("#### 3/4", "0.75", 1.0),
    ("The answer is 9.", "9", 1.0),
    ("so \\boxed{12}", "12", 1.0),
    ("#### 72 clips", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),  # GSM8K's answer column is a solution
    (chat("7 * 6 = 42\n#### 42"), "42", 1.0),
    (chat("#### 130"), 130, 1.0),
    ("#### 41", "42", 0.0),
    ("12 + 30 = 42", "42", 0.0),  # no stated answer: we never guess from the last number
    ("", "42", 0.0),
    ("#### ", "42", 0.0),
    ("#### forty-two", "42", 0.0),
    ("#### 4\n#### 42", "42", 0.0),  # hedging: the first stated answer counts
    (chat("#### 41"), "42", 0.0),
    (chat(""), "42", 0.0),
    ("#### 42", "not a number", 0.0),
    ([], "42", 0.0),
]


@pytest.mark.parametrize(("completion", "answer", "expected"), MATH_TABLE)
def test_math_answer_scores_the_stated_answer_by_value(completion, answer, expected):
    assert math_answer([completion], [answer]) == [expected]


def test_math_answer_scores_a_batch_row_by_row_against_its_own_answers():
    completions = [chat("#### 5"), chat("#### 6"), "#### 7"]
    assert math_answer(completions, ["5", "5", 7], trainer_state=None, level=[1, 2, 3]) == [1.0, 0.0, 1.0]


FORMAT_TABLE = [
    ("3 + 4 = 7\n7 * 2 = 14\n#### 14", 0.75),  # answer line and all working as equations
    ("#### 14", 0.5),  # answer line, no working
    ("3 + 4 = 7\nthen double it\n#### 14", 0.625),  # half the working lines are equations
    ("3 + 4 = 7", 0.25),  # working but no answer line
    ("I think it is fourteen", 0.0),
    ("#### fourteen", 0.0),  # an answer line must state a number
    ("", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), FORMAT_TABLE)
def test_format_rewards_the_answer_line_and_equation_working(completion, expected):
    assert format_reward([completion]) == [pytest.approx(expected)]
    assert format_reward([chat(completion)]) == [pytest.approx(expected)]


def test_format_gives_a_weak_model_signal_where_math_answer_gives_none():
    wrong = ["2 + 2 = 5\n#### 5", "no idea"]
    assert math_answer(wrong, ["4", "4"]) == [0.0, 0.0]
    first, second = format_reward(wrong)
    assert first > second


def test_completion_text_reads_strings_and_chat_messages():
    assert completion_text("abc") == "abc"
    assert completion_text(chat("a") + chat("b")) == "ab"


def test_extract_code_takes_the_fenced_python_block_or_the_whole_text():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\ndone") == "def f():\n    return 1\n"
    assert extract_code("def f(): return 1") == "def f(): return 1"


def test_split_tests_runs_humaneval_check_against_the_entry_point():
    assert split_tests(["assert f(1) == 1", "assert f(2) == 2"]) == ["assert f(1) == 1", "assert f(2) == 2"]
    (program,) = split_tests("def check(candidate):\n    assert candidate(1) == 1\n", "f")
    assert program.rstrip().endswith("check(f)")


def test_resolve_reward_refuses_custom_code_unless_allowed():
    with pytest.raises(FlywheelError, match="allow_custom_rewards"):
        resolve_reward("tests.test_rewards.chat", allow_custom=False, where="posttrain.stages.0.rewards")
    assert resolve_reward("tests.test_rewards.chat", allow_custom=True, where="x") is chat
    with pytest.raises(FlywheelError, match="cannot import"):
        resolve_reward("tests.no_such_module.fn", allow_custom=True, where="x")
    assert resolve_reward("format", allow_custom=False, where="x").__name__ == "format"


# --- code_exec ---------------------------------------------------------------------------------------------

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
TIMEOUT = 2.0
LIMITS = Limits(timeout_s=TIMEOUT)
SLACK = 4.0  # seconds over the timeout a hostile run may take (start-up, kill, clean-up) on a busy machine


def leftovers(tag: str) -> list[str]:
    """Processes whose command line carries `tag`: what a run left behind."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if tag in text:
            found.append(f"{cmdline.parent.name}: {text[:80]}")
    return found


def no_leftovers(tag: str, wait: float = 3.0) -> bool:
    """The kernel reaps a killed namespace asynchronously: give it a moment."""
    deadline = time.monotonic() + wait
    while leftovers(tag):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run_hostile(code: str, tests: list[str] | None = None):
    t0 = time.perf_counter()
    result = run_tests(code, tests or ["assert True"], LIMITS)
    assert time.perf_counter() - t0 < TIMEOUT + SLACK
    assert result.score == 0.0
    assert no_leftovers(f"flywheel-run-{result.run_id}"), leftovers(f"flywheel-run-{result.run_id}")
    return result


def test_code_exec_gives_full_marks_to_correct_code_in_a_chat_completion():
    good = chat("Sure:\n```python\ndef add(a, b):\n    return a + b\n```")
    assert code_exec([good], [ADD_TESTS]) == [1.0]


def test_code_exec_gives_the_fraction_of_asserts_that_pass():
    half_right = "def add(a, b):\n    return a + b if a >= 0 else 99"
    assert code_exec([half_right, "def add(a, b):\n    return 7"], [ADD_TESTS, ADD_TESTS]) == [
        pytest.approx(2 / 3), 0.0]


def test_code_exec_scores_code_that_does_not_compile_zero():
    assert code_exec(["def add(a, b) return a + b"], [ADD_TESTS]) == [0.0]


def test_infinite_loop_is_killed_at_the_timeout():
    result = run_hostile("while True:\n    pass")
    assert result.timed_out


FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"


def test_fork_bomb_is_killed_and_leaves_no_process_behind():
    run_hostile(FORK_BOMB)


def test_memory_bomb_fails_inside_its_limit():
    result = run_hostile("x = bytearray(8 << 30)\ny = [0] * (1 << 31)")
    assert not result.timed_out  # the address-space limit stops it at once


def test_exiting_early_with_status_zero_scores_zero():
    result = run_hostile("import os\nos._exit(0)")
    assert not result.reported


def test_printing_a_fake_report_and_exiting_scores_zero():
    run_hostile("import os, sys\nfor n in range(5):\n    print('deadbeef', n)\n    print(n, 3)\n"
                "sys.stdout.flush()\nos._exit(0)")


def test_replacing_builtins_cannot_fake_passing_tests():
    hack = "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef add(a, b):\n    return 7"
    run_hostile(hack, ADD_TESTS)


# The skips below are capability checks, not disabled tests: each defence exists only where the
# kernel offers it (pid/network namespaces via bubblewrap or `unshare`, file-system isolation via
# bubblewrap). `make test` installs bubblewrap where apt works, so on the project's machines these
# run and can fail; on a machine without them the sandbox itself warns that the defence is off. On CI
# (`.ci/run` sets FLYWHEEL_REQUIRE_CAPABILITIES=1) a missing capability fails the test instead.


def test_a_background_process_does_not_outlive_its_run():
    marker = f"sleep {4000 + os.getpid() % 1000}"
    run_hostile(f"import subprocess\nsubprocess.Popen({marker.split()!r}, start_new_session=True)\n"
                "import os\nos._exit(0)")
    if sandbox.sandbox_setup().mode == "none":
        capability_missing("no pid namespace here: a setsid'd orphan can escape (the sandbox warns about this)")
    assert no_leftovers(marker)


def test_network_calls_fail_inside_the_sandbox():
    if sandbox.sandbox_setup().mode == "none":
        capability_missing("neither bwrap nor unshare works here, so the network is not isolated")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted, done = [], threading.Event()

    def accept() -> None:
        while not done.is_set() and not accepted:
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        run_hostile(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
    finally:
        done.set()
        thread.join()
        server.close()
    assert not accepted


def test_writes_outside_the_work_folder_do_not_reach_the_machine(tmp_path):
    if sandbox.sandbox_setup().mode != "bwrap":
        capability_missing("file-system isolation needs bubblewrap (apt-get install bubblewrap)")
    targets = [tmp_path / "marker", Path.cwd() / f".flywheel-marker-{os.getpid()}", Path.home() / ".marker"]
    code = "\n".join(f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError:\n    pass"
                     for t in targets)
    try:
        result = run_tests(code + "\nok = True", ["assert ok"], LIMITS)
        assert result.score == 1.0  # the writes were attempted and contained; the code itself ran fine
        assert not [t for t in targets if t.exists()]
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_the_work_folder_is_fresh_writable_and_removed_afterwards():
    code = ("import os\nfiles = os.listdir('.')\nopen('scratch.txt', 'w').write('x')\n"
            "here = os.getcwd()\nwritten = open('scratch.txt').read()")
    tests = ["assert files == []", "assert written == 'x'"]
    result = run_tests(code, tests, LIMITS)
    assert result.score == 1.0
    assert not Path(result.workdir).exists()


def test_fork_bomb_under_the_unshare_fallback_leaves_no_survivors(monkeypatch):
    if not shutil.which("unshare"):
        capability_missing("unshare is not installed")
    setup = sandbox.sandbox_setup()
    fallback = sandbox._Setup("unshare", setup.python, setup.demote)
    if not sandbox._probe("unshare", setup.python, setup.demote):
        capability_missing("unshare -rn is not permitted here")
    monkeypatch.setattr(sandbox, "_setup", fallback)
    assert run_hostile(FORK_BOMB).mode == "unshare"


def test_code_exec_limits_are_configurable():
    slow = "import time\ntime.sleep(1.5)\ndef add(a, b):\n    return a + b"
    assert make_code_exec(Limits(timeout_s=0.5))([slow], [ADD_TESTS]) == [0.0]
    assert make_code_exec(Limits(timeout_s=5))([slow], [ADD_TESTS]) == [1.0]


def test_sandbox_uses_bubblewrap_whenever_it_works_here():
    setup = sandbox.sandbox_setup()
    if shutil.which("bwrap") and sandbox._probe("bwrap", setup.python, setup.demote):
        assert setup.mode == "bwrap"
    else:
        assert setup.mode in ("unshare", "none")
