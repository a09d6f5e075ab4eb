"""Layer launch: where one run executes, with its teacher stage and its reporter: in this
process (``platform.train``), on Ray Train workers (``launcher``), or as a Tune trial
(``trial``). Imports run, teachers and tracking; never sweeps.
"""
