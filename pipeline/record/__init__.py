"""What a call records: plans (which episodes run), the trajectory store, and views of it."""
