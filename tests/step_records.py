"""A helper the tiny end-to-end runs share (test_eschernet.py, test_zero123plus.py, test_multiview.py);
pytest puts tests/ on sys.path."""


def record_steps(exp) -> list:
    """Wrap ``exp.system.training_step`` so that each step's output (its losses) is appended to the list
    returned, the step itself unchanged."""
    records = []
    real = exp.system.training_step
    exp.system.training_step = lambda views, step: records.append(real(views, step)) or records[-1]
    return records
