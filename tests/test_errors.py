"""User errors: one base class; scripts/train.py shows their message alone, without a traceback."""

import pytest

from alignprop.errors import ConfigError, UserError
from alignprop.models import ModelLoadError
from alignprop.plan import BatchPlanError
from alignprop.prompts import PromptError
from alignprop.rewards import RewardSpecError
from alignprop.rewards.loading import WeightsNotFoundError


@pytest.mark.parametrize(
    "cls, also",
    [(ConfigError, ValueError), (BatchPlanError, ValueError), (PromptError, ValueError),
     (RewardSpecError, ValueError), (ModelLoadError, RuntimeError), (WeightsNotFoundError, RuntimeError)],
)
def test_every_user_error_shares_the_base_and_keeps_its_builtin_type(cls, also):
    assert issubclass(cls, UserError) and issubclass(cls, also)

