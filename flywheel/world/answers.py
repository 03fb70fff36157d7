"""The answer checker lives in flywheel/answers.py (RL rewards and evaluation use it too); importable from here."""

from flywheel.answers import answers_match as answers_match
from flywheel.answers import extract_answer as extract_answer
from flywheel.answers import is_correct as is_correct
from flywheel.answers import parse_number as parse_number
