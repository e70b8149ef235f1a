"""The secure room: in-air development of algorithm packages.

`api` is the contract; `service` the operator's development environment (libraries,
validation, catalogue); `libraries` and `approval` the data owner's side; `room` and
`sandbox` validate and run a package in the OS sandbox; `cli` is `cogov package` and
`cogov catalogue`. Nothing is imported here: `room` loads scipy and scikit-learn, which
a node loads only when a package runs.
"""
