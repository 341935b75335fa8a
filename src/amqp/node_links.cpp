// src/amqp/node_links.cpp
//   A request/response link pair on a node of the broker ($cbs for tokens, <entity>/$management
//   for lock renewal and deferred messages), on the AMQP thread. Invariants: requests go out in
//   the order they were sent, only while the sender has credit (the rest wait in the queue until
//   Proton reports the sender sendable); every request names the pair's reply address, unique to
//   this opening of the pair, so answers to a pair closed before come to no one.
#include "consumer_impl.hpp"

#include <proton/receiver_options.hpp>
#include <proton/target_options.hpp>

namespace sbpg::amqp {

void
NodeLinks::Open(proton::connection &conn, const std::string &node, const std::string &reply_prefix, int credit) {
	reply_ = reply_prefix + NewGuid();
	sender_ = conn.open_sender(node);
	receiver_ = conn.open_receiver(node, proton::receiver_options().credit_window(credit).target(
	                                         proton::target_options().address(reply_)));
}

void
NodeLinks::Send(proton::message m) {
	m.reply_to(reply_);
	queue_.push_back(std::move(m));
	Flush();
}

void
NodeLinks::Flush() {
	while (!queue_.empty() && sender_ && sender_.credit() > 0) {
		sender_.send(queue_.front());
		queue_.pop_front();
	}
}

void
NodeLinks::Close() {
	for (proton::link l : {proton::link(sender_), proton::link(receiver_)}) {
		try {
			if (l && l.active())
				l.close();
		} catch (const std::exception &) {
			// Already closing.
		}
	}
}

void
NodeLinks::Reset() {
	sender_ = proton::sender();
	receiver_ = proton::receiver();
	queue_.clear();
}

} // namespace sbpg::amqp
