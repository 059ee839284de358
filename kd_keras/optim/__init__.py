"""Optimisation: learning-rate schedules (`schedules`) and the optimizers (`optimizers`: SGD on
one fused kernel, LARS) with their factory. It imports nothing else of kd_keras.
"""
