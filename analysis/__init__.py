"""Reading finished experiments from disk, held-out test evaluation, ranking and the
leaderboard. Ray is never imported at module level: an experiment dir is read as files.
"""
