"""The letters of an EinsumDense equation such as `"btd,dhk->bthk"`.

Both the fast path's EinsumDense rule (`keras_dp.per_example.dense`) and
LowRankSparse's kernel views (`keras_dp.low_rank`) read a kernel as a
matrix: the letters the input contracts against the letters the output
keeps.
"""


def equation_parts(equation):
    """`(input, kernel, output)` letters of an `"in,kernel->out"` equation,
    spaces removed; None for any other form."""
    try:
        lhs, out = equation.replace(" ", "").split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        return None
    return inp, ker, out


def kernel_sides(inp, ker, out):
    """`(contracted, produced)`: the kernel's letters that the input
    contracts (in the input, not in the output) and those the output keeps
    (in the output, not in the input), each in the kernel's order."""
    contracted = "".join(c for c in ker if c in inp and c not in out)
    produced = "".join(c for c in ker if c in out and c not in inp)
    return contracted, produced
