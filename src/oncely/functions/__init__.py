"""Function-level idempotency: the ``@idempotent`` decorator and what it is built from."""

from oncely.functions.decorator import Idempotent, idempotent
from oncely.functions.lease import Claimed, current_claim

__all__ = ["Claimed", "Idempotent", "current_claim", "idempotent"]
