// src/amqp/deferred.cpp
//   Deferred messages fetched for the main thread, on the AMQP thread: one
//   com.microsoft:receive-by-sequence-number request (peek-lock) per sequence number; each message
//   in the answer is decoded, classified, given a delivery id and its lock (marked as fetched, so
//   it is settled over $management) and handed over with the other messages. Invariants: every
//   sequence number asked for either arrives as a message or comes back as a FetchFailure
//   (`not_found` when the broker answered 404); an answer that arrives on a later connection than
//   its request is a failure, since its lock token belongs to the old connection's link.
#include "consumer_impl.hpp"

#include <proton/uuid.hpp>

#include <cstring>

namespace sbpg::amqp {

void
DeferredFetches::Drain() {
	std::vector<int64_t> seqs;
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		seqs.swap(handoff_.to_fetch);
	}
	for (int64_t seq : seqs) {
		if (!mgmt_.Ready()) {
			handoff_.FetchFailed(seq, false, "the $management link is not open");
			continue;
		}
		FetchOne(seq);
	}
	handoff_.Wake();
}

void
DeferredFetches::FetchOne(int64_t seq) {
	std::map<std::string, proton::value> body;
	body["sequence-numbers"] = std::vector<int64_t>{seq};
	body["receiver-settle-mode"] = static_cast<uint32_t>(1); // peek-lock
	uint64_t g0 = live_.gen;
	mgmt_.Request("com.microsoft:receive-by-sequence-number", body,
	              [this, seq, g0](int64_t code, const std::string &desc, const proton::value &b) {
		              if (code == 200 && g0 == live_.gen)
			              OnAnswer(seq, b);
		              else
			              handoff_.FetchFailed(seq, code == 404, std::to_string(code) + " " + desc);
		              handoff_.Wake();
	              });
}

// The broker's answer: a list of maps, each with the message's lock token and its encoding.
void
DeferredFetches::Peek() {
	int64_t from;
	int count;
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		from = handoff_.peek_from;
		count = handoff_.peek_count;
	}
	auto done = [this](std::string error, std::vector<ReceivedMessage> got) {
		{
			std::lock_guard<std::mutex> g(handoff_.mu);
			handoff_.peek_done = true;
			handoff_.peek_error = std::move(error);
			handoff_.peeked = std::move(got);
		}
		handoff_.Wake();
	};
	if (!mgmt_.Ready())
		return done("the $management link is not open", {});
	std::map<std::string, proton::value> body;
	body["from-sequence-number"] = from;
	body["message-count"] = static_cast<int32_t>(count);
	mgmt_.Request("com.microsoft:peek-message", body,
	              [this, done](int64_t code, const std::string &desc, const proton::value &b) {
		              if (code == 204)
			              return done("", {});
		              if (code != 200)
			              return done(std::to_string(code) + " " + desc, {});
		              std::vector<ReceivedMessage> got;
		              proton::value list;
		              std::vector<proton::value> items;
		              try {
			              if (Management::Field(b, "messages", &list))
				              proton::get(list, items);
			              for (auto &item : items) {
				              proton::value bin;
				              if (!Management::Field(item, "message", &bin))
					              continue;
				              proton::binary raw = proton::get<proton::binary>(bin);
				              ReceivedMessage rm;
				              DecodeMessage(std::string_view(reinterpret_cast<const char *>(raw.data()), raw.size()),
				                            cfg_.max_json_depth, &rm);
				              got.push_back(std::move(rm));
			              }
		              } catch (const std::exception &e) {
			              return done(std::string("unreadable peek answer: ") + e.what(), {});
		              }
		              done("", std::move(got));
	              });
}

void
DeferredFetches::OnAnswer(int64_t seq, const proton::value &body) {
	proton::value list;
	std::vector<proton::value> items;
	try {
		if (Management::Field(body, "messages", &list))
			proton::get(list, items);
	} catch (const std::exception &) {
		items.clear();
	}
	for (auto &item : items) {
		proton::value tok, bin;
		if (Management::Field(item, "lock-token", &tok) && Management::Field(item, "message", &bin))
			Adopt(tok, bin);
	}
	if (items.empty())
		handoff_.FetchFailed(seq, false, "the broker answered without the message");
}

void
DeferredFetches::Adopt(const proton::value &tok, const proton::value &bin) {
	ReceivedMessage rm = live_.NewMessage();
	rm.fetched = true;
	uint8_t token[16];
	bool has_token = false;
	try {
		proton::uuid u = proton::get<proton::uuid>(tok);
		std::memcpy(token, &u[0], 16);
		has_token = true;
		proton::binary raw = proton::get<proton::binary>(bin);
		DecodeMessage(std::string_view(reinterpret_cast<const char *>(raw.data()), raw.size()), cfg_.max_json_depth,
		              &rm);
	} catch (const std::exception &e) {
		rm.decode_error = ToValidUtf8(std::string("the deferred message could not be decoded: ") + e.what());
	}
	handoff_.Classify(&rm);
	locks_.Hold(rm, has_token ? token : nullptr, true);
	std::lock_guard<std::mutex> g(handoff_.mu);
	handoff_.inbox.push_back(std::move(rm));
}

} // namespace sbpg::amqp
