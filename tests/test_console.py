"""The console's progress display off a terminal: plain lines, never carriage returns."""
import io

from steel_ray import console


def test_progress_off_a_terminal_prints_a_plain_line_at_the_start_and_every_tenth():
    buf = io.StringIO()
    bar = console.LineProgress(total=50, desc="explore", unit="trials", file=buf, min_interval=0)
    for i in range(50):
        bar.set_postfix_str(f"best {i}")
        bar.update(1)
    bar.close()
    bar.close()  # closing twice prints once
    out = buf.getvalue()
    lines = out.splitlines()
    assert "\r" not in out and len(lines) == 11, lines  # the first item, each further 10%, the end
    assert lines[0].startswith("explore: 1/50 trials (2%), ")
    assert lines[1].startswith("explore: 5/50 trials (10%), ") and "ETA" in lines[1] and lines[1].endswith("; best 4")
    assert lines[-1].startswith("explore: 50/50 trials (100%), ") and "ETA" not in lines[-1]


def test_progress_counts_a_resumes_earlier_items_without_a_rate():
    buf = io.StringIO()
    bar = console.LineProgress(total=4, desc="complete", file=buf, min_interval=0)
    bar.n_start = 2  # ended before this run (a resume)
    bar.update(2)
    bar.update(1)
    assert buf.getvalue().splitlines()[-1].startswith("complete: 3/4 it (75%)") and "ETA" in buf.getvalue().splitlines()[-1]
    assert "ETA" not in buf.getvalue().splitlines()[0]  # 2 of 4 counted before: no rate yet


def test_progress_is_lines_when_stderr_is_not_a_terminal(capsys):
    bar = console.progress(range(30), desc="synth", unit="img")
    assert isinstance(bar, console.LineProgress) and list(bar) == list(range(30))
    # a loop quicker than min_interval (5 s) prints its final line only
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("synth")]
    assert len(lines) == 1 and lines[0].startswith("synth: 30/30 img (100%)"), lines
