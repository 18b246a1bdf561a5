"""Studies built on runs: counterfactual retraining, validation, cleansing."""
