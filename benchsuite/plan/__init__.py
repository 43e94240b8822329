"""`benchsuite plan`: what a job grid would cost before any of it runs.

`work` counts what each job computes (training images over its epochs, evaluated test sets) from the
recipes and the datasets alone; `reuse` finds what the results folder and the feature cache already
hold; `figures` supplies milliseconds per image from `benchsuite bench` measurements; `estimate`
turns the three into device-hours per method; `report` prints them; `command` is the command line's
entry.
"""
