"""What the benchmark scripts (and the tests) compare against: the plain reference
model and the contenders of the three-way comparison. Not runnable on their own."""
