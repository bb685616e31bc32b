"""The corruption CNN (definition, data generation, training, shipped weights) lives here; it joins the
engine's batched scoring step as a metric family (engine.scoring.ScoringStep.add_family)."""
