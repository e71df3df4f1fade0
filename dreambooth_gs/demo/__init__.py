"""The demo: a subject learned on the MiniBooth world model that ships with the package (``oracle`` reads its
pictures' attributes).

May import :mod:`~dreambooth_gs.fileio`, :mod:`~dreambooth_gs.cli`, :mod:`~dreambooth_gs.resources`,
:mod:`~dreambooth_gs.train` and :mod:`~dreambooth_gs.adapters`.
"""
