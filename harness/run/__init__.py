"""Running cases on a device: Session (opened once per run), CaseRunner, the only code that touches the
device (execute.py), worker isolation, work order, order and determinism checks."""
