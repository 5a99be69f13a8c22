"""Linear-Gaussian state-space models: the Kalman recursions, their strategies, and Kalman EM."""
