// src/amqp/locks.cpp
//   The held-lock table and lock renewal, on the AMQP thread. Every message handed to the main
//   thread and not settled has its lock token and expiry here, so a long handler, a message
//   waiting in the queue to the main thread and a message held for a retry all keep their locks
//   without the main thread doing anything. Invariants: a scan runs at most every 250 ms, and only
//   while $management is open; a lock is renewed once less than half its duration (at least 2 s)
//   is left, never while a renewal or a $management settlement of it is under way, and never more
//   than max_lock_renewal_ms after receipt; a batch refused as lock-lost is retried lock by lock,
//   so only the lost lock is marked (and counted in locks_lost).
#include "consumer_impl.hpp"

#include <proton/timestamp.hpp>
#include <proton/uuid.hpp>

#include <algorithm>
#include <cstring>

namespace sbpg::amqp {

void
LockTable::Hold(const ReceivedMessage &m, const uint8_t *token, bool fetched) {
	Lock l;
	if (token) {
		std::memcpy(l.token, token, 16);
		l.has_token = true;
	}
	l.received_ms = m.received_ms;
	l.locked_until_ms = m.locked_until_ms;
	l.fetched = fetched;
	locks_[m.delivery_id] = l;
}

Lock *
LockTable::Find(uint64_t id) {
	auto it = locks_.find(id);
	return it == locks_.end() ? nullptr : &it->second;
}

void
LockTable::RenewDue(int64_t now) {
	if (!mgmt_.Ready() || now < next_scan_)
		return;
	next_scan_ = now + 250;
	std::vector<uint64_t> batch;
	for (auto &kv : locks_) {
		Lock &l = kv.second;
		if (l.renewing || l.lost || !l.has_token || !l.locked_until_ms)
			continue;
		if (now - l.received_ms >= cfg_.max_lock_renewal_ms)
			continue; // the bound on total renewal: the lock is let go
		if (!l.duration_ms)
			l.duration_ms = std::max<int64_t>(1000, l.locked_until_ms - l.received_ms);
		int64_t margin = std::max<int64_t>(l.duration_ms / 2, 2000);
		if (l.locked_until_ms - now > margin)
			continue;
		if (l.single) {
			SendRenewal({kv.first});
			continue;
		}
		batch.push_back(kv.first);
		if (batch.size() == 100) {
			SendRenewal(batch);
			batch.clear();
		}
	}
	if (!batch.empty())
		SendRenewal(batch);
}

void
LockTable::SendRenewal(const std::vector<uint64_t> &ids) {
	std::vector<proton::uuid> tokens;
	for (uint64_t id : ids) {
		Lock &l = locks_[id];
		l.renewing = true;
		proton::uuid u;
		std::memcpy(&u[0], l.token, 16);
		tokens.push_back(u);
	}
	std::map<std::string, proton::value> body;
	body["lock-tokens"] = tokens;
	auto done = [this, ids](int64_t code, const std::string &, const proton::value &b) {
		for (uint64_t id : ids) {
			auto it = locks_.find(id);
			if (it != locks_.end())
				it->second.renewing = false;
		}
		if (code == 200)
			OnRenewed(ids, b);
		else if (code == 410)
			OnLockLost(ids);
		// -1: the connection is gone, and its locks with it. Anything else: try again at the next scan.
	};
	mgmt_.Request("com.microsoft:renew-lock", body, done);
}

// The broker renewed the locks: their new expiries, in the order asked (30 s when it gave none).
void
LockTable::OnRenewed(const std::vector<uint64_t> &ids, const proton::value &body) {
	std::vector<proton::timestamp> until;
	proton::value v;
	try {
		if (Management::Field(body, "expirations", &v))
			proton::get(v, until);
	} catch (const std::exception &) {
		until.clear();
	}
	uint64_t renewed = 0;
	for (size_t i = 0; i < ids.size(); ++i) {
		auto it = locks_.find(ids[i]);
		if (it == locks_.end())
			continue;
		it->second.locked_until_ms = i < until.size() ? until[i].milliseconds() : Now() + 30000;
		++renewed;
	}
	std::lock_guard<std::mutex> g(handoff_.mu);
	handoff_.status.lock_renewals += renewed;
}

// A lock in the batch is gone: find which by renewing each alone.
void
LockTable::OnLockLost(const std::vector<uint64_t> &ids) {
	if (ids.size() == 1) {
		auto it = locks_.find(ids[0]);
		if (it != locks_.end())
			it->second.lost = true;
		std::lock_guard<std::mutex> g(handoff_.mu);
		++handoff_.status.locks_lost;
		return;
	}
	for (uint64_t id : ids) {
		auto it = locks_.find(id);
		if (it != locks_.end())
			it->second.single = true;
	}
}

} // namespace sbpg::amqp
