"""Validators of public arguments: one copy of each check, one kind of message.

A DP library must refuse a bad setting before it trains or reports with it:
a NaN clipping norm or a negative noise multiplier would otherwise give an
update, or an epsilon, without the guarantee it claims. Every public
constructor and function of keras_dp checks its arguments with these
functions. Each returns the value in its plain Python type (`float`, `int`,
`bool`, `str`) and raises with a message that names the argument, shows
the value received and says what is allowed:

```python
from keras_dp import arguments

arguments.finite_number("l2_norm_clip", 1.0, low=0, low_open=True)  # 1.0
arguments.positive_int("batch_size", 0)
# ValueError: `batch_size` must be a positive integer. Received: batch_size=0.
```

The rules:

- A value of the wrong kind (a string or a bool where a number is
  needed, a float where an integer is needed) raises `ArgumentTypeError`,
  which is both a `TypeError` and a `ValueError`, so code that catches
  either catches it. A value of the right kind out of range raises
  `ValueError`.
- Numbers are Python and NumPy integers and floats (`numbers.Real`);
  `True` and `False` are not numbers. NaN and +-inf are refused wherever a
  finite value is needed, which is everywhere here.
"""

import inspect
import math
import numbers
import operator

import numpy as np

# Seeds that every backend's random generator takes: Keras's seed state is
# an int32 on PyTorch and a uint32 on JAX.
MAX_SEED = 2**31 - 1

# Values longer than this are cut short in messages (an array passed by
# mistake would otherwise fill the screen).
_MAX_SHOWN = 200


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind: a `TypeError` that is also a
    `ValueError` (keras_dp raised `ValueError` for these before)."""


def is_number(value):
    """Whether `value` is a real number: a Python or NumPy int or float,
    not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_integer(value):
    """Whether `value` is a Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(
        value, (bool, np.bool_)
    )


def finite_number(
    name,
    value,
    low=None,
    high=None,
    *,
    low_open=False,
    high_open=False,
    allow_none=False,
    hint=None,
):
    """`value` as a finite Python float in the given range.

    Args:
        name: the argument's name, for the message.
        value: the value received.
        low, high: optional bounds.
        low_open, high_open: whether the bounds are excluded.
        allow_none: whether None is allowed (then returned as is).
        hint: what the argument is, appended to the message.

    Raises:
        ArgumentTypeError: `value` is not a number.
        ValueError: it is NaN, infinite or out of range.
    """
    if value is None and allow_none:
        return None
    allowed = _number_range(low, high, low_open, high_open)
    if not is_number(value):
        raise ArgumentTypeError(_message(name, value, allowed, allow_none, hint))
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not (
        math.isfinite(number)
        and (low is None or (number > low if low_open else number >= low))
        and (high is None or (number < high if high_open else number <= high))
    ):
        raise ValueError(_message(name, value, allowed, allow_none, hint))
    return number


def positive_number(name, value, *, allow_none=False, hint=None):
    """`value` as a finite float `> 0` (see `finite_number`)."""
    return finite_number(
        name, value, low=0, low_open=True, allow_none=allow_none, hint=hint
    )


def non_negative_number(name, value, *, allow_none=False, hint=None):
    """`value` as a finite float `>= 0` (see `finite_number`)."""
    return finite_number(name, value, low=0, allow_none=allow_none, hint=hint)


def probability(
    name, value, *, low_open=False, high_open=False, allow_none=False, hint=None
):
    """`value` as a float in `[0, 1]`, or an interval with open ends
    (see `finite_number`)."""
    return finite_number(
        name,
        value,
        low=0,
        high=1,
        low_open=low_open,
        high_open=high_open,
        allow_none=allow_none,
        hint=hint,
    )


def integer(
    name,
    value,
    low=None,
    high=None,
    *,
    allow_none=False,
    integral_float=False,
    hint=None,
):
    """`value` as a Python int in `[low, high]` (bounds optional).

    `integral_float`: also take a float with an integer value (`2.0`).

    Raises:
        ArgumentTypeError: `value` is not an integer.
        ValueError: it is out of range.
    """
    if value is None and allow_none:
        return None
    allowed = _integer_range(low, high)
    if is_integer(value):
        number = operator.index(value)
    elif (
        integral_float
        and is_number(value)
        and math.isfinite(value)
        and float(value).is_integer()
    ):
        number = int(value)
    else:
        raise ArgumentTypeError(_message(name, value, allowed, allow_none, hint))
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(_message(name, value, allowed, allow_none, hint))
    return number


def positive_int(name, value, *, allow_none=False, hint=None):
    """`value` as a Python int `>= 1` (see `integer`)."""
    return integer(name, value, low=1, allow_none=allow_none, hint=hint)


def seed(name, value, *, allow_none=True, hint=None):
    """A random seed: an int in `[0, MAX_SEED]`, or None."""
    return integer(name, value, low=0, high=MAX_SEED, allow_none=allow_none, hint=hint)


def boolean(name, value, *, hint=None):
    """`value` as a Python bool; only `True` and `False` (NumPy's too)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ArgumentTypeError(_message(name, value, "True or False", False, hint))


def non_empty_string(name, value, *, hint=None):
    """`value` as a `str` with at least one character."""
    allowed = "a non-empty string"
    if not isinstance(value, str):
        raise ArgumentTypeError(_message(name, value, allowed, False, hint))
    if not value:
        raise ValueError(_message(name, value, allowed, False, hint))
    return str(value)


def instance_of(name, value, cls, what, *, allow_none=False, hint=None):
    """`value` if it is an instance of `cls` (described as `what`, e.g.
    "a keras.Model"), else `ArgumentTypeError`."""
    if (value is None and allow_none) or isinstance(value, cls):
        return value
    kind = type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    raise ArgumentTypeError(
        _message(name, value, what, allow_none, hint)[:-1] + f" ({article} {kind})."
    )


def function(name, value, num_args, signature, *, allow_none=False, hint=None):
    """`value` if it is callable with `num_args` positional arguments
    (`signature` shows how, e.g. "fn(x, seed)"), else `ArgumentTypeError`.
    Callables whose signature cannot be read (builtins) are taken."""
    if value is None and allow_none:
        return None
    allowed = f"a function {signature}"
    if not callable(value):
        raise ArgumentTypeError(_message(name, value, allowed, allow_none, hint))
    try:
        parameters = inspect.signature(value)
    except (TypeError, ValueError):
        return value
    try:
        parameters.bind(*([None] * num_args))
    except TypeError:
        raise ArgumentTypeError(
            _message(name, value, allowed, allow_none, hint)[:-1]
            + f", whose signature is {parameters}."
        ) from None
    return value


def one_of(name, value, choices, *, allow_none=False, what=None):
    """The one of `choices` that equals `value`.

    `what`: what the choices are ("clipping mode"); the message then reads
    "Unknown clipping mode 'x': `clipping` must be one of ...".

    Raises:
        ArgumentTypeError: `value` is of no choice's type.
        ValueError: it is of the right type but none of them.
    """
    if value is None and allow_none:
        return None
    for choice in choices:
        if isinstance(value, type(choice)) and value == choice:
            return choice
    allowed = "one of " + ", ".join(repr(choice) for choice in choices)
    if what is None:
        message = _message(name, value, allowed, allow_none, None)
    else:
        message = f"Unknown {what} {_shown(value)}: `{name}` must be {allowed}" + (
            ", or None." if allow_none else "."
        )
    kinds = tuple(type(choice) for choice in choices)
    if not isinstance(value, kinds):
        raise ArgumentTypeError(message)
    raise ValueError(message)


def _number_range(low, high, low_open, high_open):
    if low is None and high is None:
        return "a finite number"
    if high is None:
        if low == 0:
            return (
                "a positive finite number (> 0)"
                if low_open
                else "a non-negative finite number (>= 0)"
            )
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    if low_open and high_open:
        return f"in the open interval ({low:g}, {high:g})"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _integer_range(low, high):
    if low is None and high is None:
        return "an integer"
    if high is None:
        if low == 1:
            return "a positive integer"
        if low == 0:
            return "a non-negative integer"
        return f"an integer >= {low}"
    if low is None:
        return f"an integer <= {high}"
    return f"an integer >= {low} and <= {high}"


def _message(name, value, allowed, allow_none, hint):
    return (
        f"`{name}` must be {allowed}"
        + (", or None" if allow_none else "")
        + (f": {hint}" if hint else "")
        + f". Received: {name}={_shown(value)}."
    )


def _shown(value):
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return text
