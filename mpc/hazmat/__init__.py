"""Hazardous primitives under `mpc`: group arithmetic, ElGamal, worker pools.

Nothing here checks that it is used safely. Scenario code calls the verbs in
`mpc.xid` and `mpc.psi` instead.
"""
