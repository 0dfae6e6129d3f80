#!/usr/bin/env python3
"""Prints the Chebyshev coefficients loupe.c uses for erf (table erf_chebyshev).

erf(x) / x is an even, entire function, so on |x| <= 4 it is a smooth function
g(t) of t = x * x in [0, 16]. With u = t / 8 - 1 in [-1, 1], g = sum_k c_k T_k(u)
(the k = 0 term halved), and the c_k come from sampling g at the Chebyshev nodes
(a discrete cosine transform). They fall below 1e-9 by k = 18, far under float
precision, so the table stops at k = 17. Standard library only; run it to check
or regenerate the table:  python3 tools/erf_coefficients.py
"""
import math

TERMS = 18       # c_0 .. c_17
NODES = 256      # sampling points; more than enough for double-precision c_k
T_MAX = 16.0     # t = x * x up to 4 * 4: beyond |x| = 4, erf(x) rounds to +-1 in float


def g(u):
    t = (u + 1.0) * T_MAX / 2.0
    if t == 0.0:
        return 2.0 / math.sqrt(math.pi)
    x = math.sqrt(t)
    return math.erf(x) / x


def main():
    theta = [math.pi * (j + 0.5) / NODES for j in range(NODES)]
    values = [g(math.cos(a)) for a in theta]
    for k in range(TERMS):
        c = 2.0 / NODES * sum(v * math.cos(k * a) for v, a in zip(values, theta))
        print("%.9ef," % c)


if __name__ == "__main__":
    main()
