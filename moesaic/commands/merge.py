"""`moesaic merge`: placeholder registered until its module is written."""


def register(sub) -> None:
    del sub
