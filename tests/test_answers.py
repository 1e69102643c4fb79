"""The numeric-answer reward for math word problems (GSM8K's `#### n` answers), against hand-worked cases."""

import pytest

from copg_jax.rewards import RewardConfig, build_reward, score_rows
from copg_jax.rewards.answers import completion_answer, numeric_answer, reference_answer

GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72"
)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("She sold 48 + 24 = 72 clips.", 1.0),  # the last number
        ("72 clips, not 71", 0.0),  # the last number, not the first
        ("So the answer is $72.", 1.0),  # a dollar sign and a full stop
        ("#### 72.00", 1.0),  # GSM8K's own marker, trailing zeros
        ("#### 72\nThen 5 more", 1.0),  # the marker wins over later numbers
        ("The answer is \\boxed{72} (not 80)", 1.0),  # the last \boxed{} wins over the last number
        ("\\boxed{\\frac{144}{2}}", 0.0),  # no symbolic maths
        ("I do not know", 0.0),
        ("", 0.0),
        ([{"role": "assistant", "content": "It is 72"}], 1.0),  # a chat prompt's completion, as TRL passes it
        ("72 apples in w5", 1.0),  # the digits of a word are no number
        ("72 or 7,2", 0.0),  # "7,2" is no thousands separator: its last number is 2
        ("about 1,072 clips... no, 72", 1.0),
    ],
)
def test_numeric_answer_reads_the_completions_answer(completion, expected):
    assert numeric_answer([completion], [GSM8K_ANSWER]) == [expected]


def test_reference_answers_are_exact_decimals():
    assert reference_answer(GSM8K_ANSWER) == reference_answer("72") == reference_answer(72)
    assert reference_answer("#### 1,234") == 1234 and reference_answer("-0.5") == reference_answer(-0.5)
    assert completion_answer("about 0.30") == reference_answer("0.3")  # exact: no float rounding
    assert completion_answer("0.1 + 0.2 = 0.30000000000000004") != reference_answer("0.3")
    with pytest.raises(ValueError, match=r"the answer '\\\\frac\{1\}\{2\}' is no number"):
        reference_answer("\\frac{1}{2}")


def test_a_row_whose_answer_is_no_number_fails_alone():
    """Through the reward machinery, as rollouts call it: by name, the prompt rows' `answer` field."""
    rows = [{"prompt": "q1", "answer": "#### 4"}, {"prompt": "q2", "answer": "x^2"}]
    reward = build_reward(RewardConfig(fn="copg_jax.rewards.answers:numeric_answer"), rows)
    result = score_rows(
        reward, ["q1", "q2", "q1"], ["so 4", "so 4", "5"], fields={"answer": ["#### 4", "x^2", "#### 4"]}
    )
    assert result.scores[[0, 2]].tolist() == [1.0, 0.0]
    assert result.errors[1] == "ValueError: the answer 'x^2' is no number (numeric_answer reads numbers only)"


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("It falls to \u22125 degrees.\n#### \u22125", "5", 0.0),  # a Unicode minus is a minus
        ("It falls to \u22125 degrees.\n#### \u22125", "-5", 1.0),
        ("She has \u20133 dollars left. #### \u20133", "-3", 1.0),  # so is an en dash before digits
        ("\\boxed{\u22125}", "-5", 1.0),
        ("Each rope is 2.5m long.\n#### 2.5m", "2", 0.0),  # a number is read whole, never its integer part
        ("Each rope is 2.5m long.\n#### 2.5m", "2.5", 1.0),
        ("It is 2.5e3 grams.", "2500", 1.0),
        ("#### 1e5", "100000", 1.0),
        ("#### 3/4", "3", 0.0),  # a fraction is its value
        ("#### 3/4", "0.75", 1.0),
        ("The answer is 3 / 4", "3/4", 1.0),
        ("#### 2^10", "2", 0.0),  # a power is no number this checker reads
        ("1/2/3", "3", 0.0),
        ("#### 1,234km", "1234", 1.0),
        ("#### 123456", "1,23,456", 1.0),  # a reference's own spellings: Indian grouping, a spaced $
        ("#### 5", "$ 5", 1.0),
        ("The divisors are 5,10,20,25,50,100", "50100", 0.0),  # a list ends with its last item
        ("The divisors are 5,10,20,25,50,100", "100", 1.0),
        ("#### " + "9" * 5000, "9", 0.0),  # past MAX_CHARACTERS: no number (its exact value took seconds)
        ("\\boxed{5\\%}", "5", 1.0),  # LaTeX's escaped percent and dollar, its braced comma
        ("\\boxed{\\$5}", "5", 1.0),
        ("\\boxed{1{,}000}", "1000", 1.0),
        ("\\boxed{5}\n####", "5", 1.0),  # a marker with no number after it leaves the boxed answer
        ("\\boxed{1e999999999999999999999}", "1", 0.0),  # past the decimal module's exponents: no number
        ("#### 4/0", "4", 0.0),
    ],
)
def test_numeric_answer_reads_signs_units_fractions_and_latex(completion, reference, expected):
    """Wrong answers that an earlier reading scored 1.0 (a Unicode minus dropped, 2.5m read as 2, 3/4 as 3)
    and right ones it scored 0.0."""
    assert numeric_answer([completion], [reference]) == [expected]
