"""Privacy auditing in one training run (Steinke, Nasr and Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023).

An audit trains one model with `m` canaries, each included independently
with probability 1/2, guesses from the trained model (or its updates) which
canaries were included, and turns the number of correct guesses into a
statistical lower bound on the run's epsilon. A lower bound above the
epsilon the run claims proves that the claim is wrong (a bug in the
mechanism or its accounting); one below it proves nothing about privacy.

- `audit_input_canaries`: black box. Out-of-distribution canary examples
  in the training set, scored on the final model.
- `audit_gradient_canaries`: white box. Dirac canary gradients of the
  clipped norm added to the clipped sum before the noise, observed at every
  update (`DiracCanaries` for a custom loop).
- `audit_scores`: the statistics alone, for canaries you score yourself;
  `epsilon_lower_bound` and `p_value` for counts of guesses.

Example:

```python
result = keras_dp.audit.audit_gradient_canaries(
    model, x_train, y_train, num_canaries=1000, epochs=3, batch_size=64)
print(result.summary())   # lower bound, confidence, claimed epsilon, verdict
```
"""

from keras_dp.auditing.bounds import default_guess_candidates
from keras_dp.auditing.bounds import epsilon_lower_bound
from keras_dp.auditing.bounds import p_value
from keras_dp.auditing.gradient_canaries import DiracCanaries
from keras_dp.auditing.gradient_canaries import audit_gradient_canaries
from keras_dp.auditing.input_canaries import audit_input_canaries
from keras_dp.auditing.input_canaries import loss_scores
from keras_dp.auditing.input_canaries import make_input_canaries
from keras_dp.auditing.result import AuditResult
from keras_dp.auditing.result import audit_scores

__all__ = [
    "audit_gradient_canaries",
    "audit_input_canaries",
    "audit_scores",
    "AuditResult",
    "default_guess_candidates",
    "DiracCanaries",
    "epsilon_lower_bound",
    "loss_scores",
    "make_input_canaries",
    "p_value",
]
