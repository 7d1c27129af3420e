"""The parts of `keras_dp.audit`: the statistics (`bounds`), the result
(`result`), and the two kinds of canaries (`input_canaries`,
`gradient_canaries`). Import the public names from `keras_dp.audit`."""
