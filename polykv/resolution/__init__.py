"""Resolution: what a spec leaves open (auto policies, @auto budgets), decided from a profile."""
