// sbpg/core/histogram.hpp
//   A latency histogram for one minute of a worker's history (sbpg.stats_history): counts in
//   logarithmic buckets, eight per doubling from 1 microsecond to about 3.2 days, so a
//   percentile it reports is within 4.5% of the true value (half a bucket's width), clamped to the
//   smallest and largest value seen. Fixed size (no allocation), plain data: it may live in a
//   frame PostgreSQL longjmps over. Pure C++ (no PostgreSQL header).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "sbpg/core/cpp_only.hpp"

namespace sbpg {

class Histogram {
  public:
	static constexpr int kPerDoubling = 8;
	static constexpr int kBuckets = 38 * kPerDoubling + 1; // bucket 0: below 1 microsecond
	static constexpr double kFloorMs = 0.001;

	void Clear() { std::memset(this, 0, sizeof *this); }

	void Add(double ms) {
		if (!(ms >= 0)) // NaN, or a clock that went backwards
			ms = 0;
		counts_[Bucket(ms)]++;
		if (count_ == 0 || ms < min_)
			min_ = ms;
		if (count_ == 0 || ms > max_)
			max_ = ms;
		++count_;
	}

	uint64_t Count() const { return count_; }

	// The value below which a fraction q (0 < q <= 1) of the values fall: the geometric middle of
	// the bucket that holds the value of rank ceil(q * count). Negative when empty.
	double Percentile(double q) const {
		if (count_ == 0)
			return -1;
		uint64_t rank = static_cast<uint64_t>(std::ceil(q * static_cast<double>(count_)));
		if (rank < 1)
			rank = 1;
		uint64_t seen = 0;
		for (int b = 0; b < kBuckets; ++b) {
			seen += counts_[b];
			if (seen >= rank)
				return b == kBuckets - 1 ? max_ : Clamp(b == 0 ? 0 : Middle(b)); // the last has no upper bound
		}
		return max_;
	}

  private:
	static int Bucket(double ms) {
		if (ms < kFloorMs)
			return 0;
		int b = 1 + static_cast<int>(std::floor(std::log2(ms / kFloorMs) * kPerDoubling));
		return b >= kBuckets ? kBuckets - 1 : b;
	}
	// Bucket b >= 1 holds [floor * 2^((b-1)/k), floor * 2^(b/k)).
	static double Middle(int b) { return kFloorMs * std::exp2((b - 0.5) / kPerDoubling); }
	double Clamp(double v) const { return v < min_ ? min_ : (v > max_ ? max_ : v); }

	uint32_t counts_[kBuckets];
	uint64_t count_;
	double min_, max_;
};

} // namespace sbpg
