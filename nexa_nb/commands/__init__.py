"""One module per ``%nexa_*`` magic: each has a `run` that takes the parsed flags and does the work.

`nexa_nb.magics` declares the magics (their flags and ``?`` help) and routes each line here.
"""
