"""What the results mean: published numbers, seed statistics, comparisons, calibration, plots, the site.

The markdown leaderboard (`benchsuite.leaderboard`) merges and refuses results; this package turns
the merged results into the numbers and pictures a reader needs to trust them.
"""
