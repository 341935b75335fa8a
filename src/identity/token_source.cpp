// src/identity/token_source.cpp
//   TokenSource: one identity's token kept fresh on a thread of its own (every signal blocked on
//   it). The thread fetches at start, renews per RefreshAt, and backs off with full jitter after a
//   failure or a refusal by the broker; everything it shares with callers is under mu_, and the
//   token itself is never logged.
#include "sbpg/identity/token.hpp"

#include "sbpg/core/text.hpp"
#include "sbpg/identity/http.hpp"

#include <algorithm>
#include <chrono>
#include <csignal>

#include <pthread.h>

namespace sbpg {

TokenSource::TokenSource(std::unique_ptr<TokenProvider> provider, std::function<void()> on_change)
    : provider_(std::move(provider)), on_change_(std::move(on_change)), rng_(std::random_device{}()) {
	status_.provider = provider_->Describe();
}

TokenSource::~TokenSource() {
	Stop();
}

void
TokenSource::Start() {
	if (started_)
		return;
	started_ = true;
	HttpGlobalInit();
	provider_->SetAbort(&abort_);
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	thread_ = std::thread([this] { Run(); });
	pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

void
TokenSource::Stop() {
	{
		std::lock_guard<std::mutex> g(mu_);
		if (stop_)
			return;
		stop_ = true;
	}
	cv_.notify_all();
	if (thread_.joinable())
		thread_.join();
}

bool
TokenSource::Current(AccessToken *out) {
	std::lock_guard<std::mutex> g(mu_);
	if (token_.token.empty() || token_.expires_ms <= WallMs())
		return false;
	*out = token_;
	return true;
}

TokenSource::Status
TokenSource::GetStatus() {
	std::lock_guard<std::mutex> g(mu_);
	Status s = status_;
	s.has_token = !token_.token.empty() && token_.expires_ms > WallMs();
	s.expires_ms = token_.expires_ms;
	s.subject = token_.subject;
	return s;
}

void
TokenSource::Abort() {
	abort_.store(true);
	Stop();
}

std::vector<TokenSource::LogLine>
TokenSource::TakeLog() {
	std::lock_guard<std::mutex> g(mu_);
	std::vector<LogLine> l;
	l.swap(log_);
	return l;
}

void
TokenSource::Invalidate(uint64_t serial, const std::string &why) {
	{
		std::lock_guard<std::mutex> g(mu_);
		if (serial != token_.serial)
			return; // a newer token is already there
		++refusals_;
		int64_t now = WallMs();
		int64_t ceiling = std::min<int64_t>(300000, 1000LL << std::min(refusals_ - 1, 16));
		int64_t delay = ceiling / 2 + static_cast<int64_t>(rng_() % static_cast<uint64_t>(ceiling / 2 + 1));
		// Never sooner than a failure backoff or Retry-After the endpoint asked for.
		int64_t at = std::max(now + (refusals_ == 1 ? 0 : delay), backoff_until_);
		if (at <= now)
			force_ = true;
		else if (at < next_ms_)
			next_ms_ = at;
		log_.push_back({false, "the broker refused token " + std::to_string(serial) + " (" + why + "); " +
		                           (at <= now ? std::string("asking for a new one now")
		                                      : "asking for a new one in " + std::to_string(at - now) + " ms")});
	}
	cv_.notify_all();
}

void
TokenSource::Accepted(uint64_t serial) {
	std::lock_guard<std::mutex> g(mu_);
	if (serial == token_.serial)
		refusals_ = 0;
}

void
TokenSource::Run() {
	std::mt19937_64 rng{std::random_device{}()};
	int failures = 0;
	for (;;) {
		{
			std::unique_lock<std::mutex> g(mu_);
			while (!stop_ && !force_ && WallMs() < next_ms_)
				cv_.wait_for(g, std::chrono::milliseconds(std::min<int64_t>(next_ms_ - WallMs(), 1000)));
			if (stop_)
				return;
			force_ = false;
		}
		TokenResult r = provider_->Fetch();
		std::vector<std::string> notes = provider_->TakeNotes();
		int64_t now = WallMs();
		bool changed = true;
		{
			std::lock_guard<std::mutex> g(mu_);
			for (auto &n : notes)
				log_.push_back({false, n});
			++status_.fetches;
			status_.provider = provider_->Describe();
			if (r.ok) {
				int recovering = failures;
				token_ = r.token;
				token_.serial = next_serial_++;
				failures = 0;
				next_ms_ = r.token.refresh_ms;
				backoff_until_ = 0;
				bool routine = token_.serial > 1 && !recovering;
				log_.push_back(
				    {routine, "token " + std::to_string(token_.serial) + " obtained from " + status_.provider +
				                  (recovering ? " after " + std::to_string(recovering) + " failed attempts" : "") +
				                  ": subject " + (r.token.subject.empty() ? "?" : r.token.subject) + ", audience " +
				                  (r.token.audience.empty() ? "?" : r.token.audience) + ", expires " +
				                  FormatTime(r.token.expires_ms) + ", next renewal " + FormatTime(next_ms_)});
				status_.last_error.clear();
			} else {
				++failures;
				++status_.failures;
				// Exponential backoff with full jitter; slower for errors a retry is unlikely to cure.
				int64_t base = r.retryable ? 500 : 10000;
				int64_t cap = r.retryable ? 30000 : 300000;
				int64_t ceiling = std::min<int64_t>(cap, base << std::min(failures - 1, 16));
				int64_t delay = static_cast<int64_t>(rng() % static_cast<uint64_t>(ceiling + 1));
				// While the current token is valid, try again within its remaining life...
				if (!token_.token.empty() && token_.expires_ms > now)
					delay = std::min<int64_t>(delay, std::max<int64_t>((token_.expires_ms - now) / 2, 1000));
				// ...but never sooner than the endpoint asked, nor in a tight loop.
				delay = std::max<int64_t>({delay, r.retry_after_ms, 250});
				next_ms_ = now + delay;
				backoff_until_ = next_ms_;
				changed = status_.last_error != r.error || failures == 1;
				status_.last_error = r.error;
				status_.last_error_ms = now;
				log_.push_back(
				    {false, "token request failed (attempt " + std::to_string(failures) + ", " +
				                (r.retryable ? "retrying" : "not likely to be cured by a retry; retrying slowly") +
				                " in " + std::to_string(delay) + " ms): " + r.error});
			}
		}
		if (changed && on_change_)
			on_change_();
	}
}

} // namespace sbpg
