"""`estbench check` catches a wrong claim and passes a right one."""

from estbench.cli import main


def test_check_refutes_a_biased_estimator_that_claims_unbiasedness(capsys):
    code = main(["check", "mean-baseline", "--plugin", "examples/biased_estimator.py",
                 "--samples", "5000"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "verdict: FAIL" in out


def test_check_passes_a_correct_estimator_and_takes_parameters(capsys):
    assert main(["check", "rloo", "--param", "samples=3", "--samples", "5000"]) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "categorical D=3 K=3" in out


def test_check_reports_but_does_not_judge_a_biased_estimator(capsys):
    assert main(["check", "gumbel-softmax", "--param", "temperature=0.5", "--samples", "2000"]) == 0
    assert "does not claim unbiasedness" in capsys.readouterr().out


def test_check_bad_input(capsys):
    assert main(["check", "gumbel"]) == 2
    assert "gumbel-softmax" in capsys.readouterr().err
    assert main(["check", "reinmax", "--param", "temperature=0.5"]) == 2
    assert "temperature must be >= 1.0" in capsys.readouterr().err
    assert main(["check", "rloo", "--param", "samples"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
