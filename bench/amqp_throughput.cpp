// bench/amqp_throughput.cpp
//   A Proton C++ client that measures one sender or one peek-lock receiver against an AMQP
//   endpoint (sbemu, or a Proton example broker as the baseline).
//
//   amqp_throughput send URL ADDRESS COUNT [BODY_BYTES]
//       sends COUNT messages as fast as credit allows; the clock stops at the last accept.
//   amqp_throughput recv URL ADDRESS COUNT [CREDIT]
//       receives COUNT messages with a credit window (default 1000), rcv-settle-mode second
//       (peek-lock, as Service Bus clients use) and one accept per message.
//   amqp_throughput paced URL ADDRESS COUNT RATE [FIRST_ID]
//       sends COUNT JSON messages at RATE msg/s (as scheduled, not as fast as possible), each
//       {"id": FIRST_ID + i, "customer": ..., "amount": ..., "note": "<wall clock at send, in
//       microseconds since the epoch>"}, message id "paced-<i>", content type application/json:
//       bench/sbpg.sh's latency at a high rate reads the send time back from the handler's row.
//   Prints: mode=send messages=N seconds=S rate=R
//
//   Authentication: SASL PLAIN with the emulator's default key when the endpoint offers it,
//   ANONYMOUS otherwise (user and password come from SBPG_BENCH_USER/SBPG_BENCH_PASSWORD).
#include <proton/connection.hpp>
#include <proton/connection_options.hpp>
#include <proton/container.hpp>
#include <proton/delivery.hpp>
#include <proton/link.h>
#include <proton/message.hpp>
#include <proton/message_id.hpp>
#include <proton/messaging_handler.hpp>
#include <proton/receiver.hpp>
#include <proton/receiver_options.hpp>
#include <proton/sender.hpp>
#include <proton/tracker.hpp>
#include <proton/work_queue.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

namespace {

// Reaches the C link under a Proton C++ link (for rcv-settle-mode, which the 0.37 C++ API lacks):
// a pointer to the protected accessor, formed through a derived class, is legal to call on any link.
struct LinkAccess : proton::receiver {
	static pn_link_t *Get(const proton::link &l) {
		auto fn = &LinkAccess::pn_object;
		return (l.*fn)();
	}
};

using Clock = std::chrono::steady_clock;

proton::connection_options
Auth() {
	const char *u = std::getenv("SBPG_BENCH_USER");
	const char *p = std::getenv("SBPG_BENCH_PASSWORD");
	proton::connection_options o;
	o.sasl_allow_insecure_mechs(true);
	o.user(u ? u : "RootManageSharedAccessKey");
	o.password(p ? p : "SAS_KEY_VALUE");
	return o;
}

// What both senders share: the link to URL/ADDRESS, the count of accepted messages (the clock
// stops at the last), rejections and errors.
class SenderBase : public proton::messaging_handler {
  public:
	SenderBase(std::string url, std::string addr, long count)
	    : url_(std::move(url)), addr_(std::move(addr)), count_(count) {}
	void on_container_start(proton::container &c) override { c.open_sender(url_ + "/" + addr_, Auth()); }
	void on_tracker_accept(proton::tracker &t) override {
		if (++confirmed_ == count_) {
			end_ = Clock::now();
			t.connection().close();
		}
	}
	void on_tracker_reject(proton::tracker &t) override {
		std::cerr << "send rejected" << std::endl;
		failed_ = true;
		t.connection().close();
	}
	void on_error(const proton::error_condition &e) override {
		std::cerr << "error: " << e.what() << std::endl;
		failed_ = true;
	}
	double Seconds() const { return std::chrono::duration<double>(end_ - start_).count(); }
	long confirmed() const { return confirmed_; }
	bool failed() const { return failed_; }

  protected:
	std::string url_, addr_;
	long count_, sent_ = 0, confirmed_ = 0;
	Clock::time_point start_, end_;
	bool failed_ = false;
};

// As fast as credit allows.
class Sender : public SenderBase {
  public:
	Sender(std::string url, std::string addr, long count, size_t size)
	    : SenderBase(std::move(url), std::move(addr), count), body_(size, 'x') {}
	void on_sendable(proton::sender &s) override {
		if (sent_ == 0)
			start_ = Clock::now();
		while (s.credit() > 0 && sent_ < count_) {
			proton::message m;
			m.id(proton::message_id(std::to_string(sent_ + 1)));
			m.body(proton::binary(body_.begin(), body_.end()));
			s.send(m);
			++sent_;
		}
	}

  private:
	std::string body_;
};

// On a schedule: every millisecond, the messages whose send time has come (RATE per second).
class PacedSender : public SenderBase {
  public:
	PacedSender(std::string url, std::string addr, long count, double rate, long first_id)
	    : SenderBase(std::move(url), std::move(addr), count), rate_(rate), first_id_(first_id) {}
	void on_sender_open(proton::sender &s) override {
		sender_ = s;
		start_ = Clock::now();
		Tick();
	}

  private:
	void Tick() {
		double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
		long due = std::min(count_, static_cast<long>(elapsed * rate_) + 1);
		while (sent_ < due && sender_.credit() > 0) {
			long i = sent_++;
			long long us = std::chrono::duration_cast<std::chrono::microseconds>(
			                   std::chrono::system_clock::now().time_since_epoch())
			                   .count();
			char body[160];
			std::snprintf(body, sizeof body, "{\"id\":%ld,\"customer\":\"c%ld\",\"amount\":%ld,\"note\":\"%lld\"}",
			              first_id_ + i, i % 50, i % 90 + 1, us);
			proton::message m;
			m.id(proton::message_id("paced-" + std::to_string(i)));
			m.content_type("application/json");
			std::string b(body);
			m.body(proton::binary(b.begin(), b.end()));
			sender_.send(m);
		}
		if (sent_ < count_)
			sender_.work_queue().schedule(proton::duration(1), [this] { Tick(); });
	}
	double rate_;
	long first_id_;
	proton::sender sender_;
};

class Receiver : public proton::messaging_handler {
  public:
	Receiver(std::string url, std::string addr, long count, int credit)
	    : url_(std::move(url)), addr_(std::move(addr)), count_(count), credit_(credit) {}
	void on_container_start(proton::container &c) override {
		proton::receiver r =
		    c.open_receiver(url_ + "/" + addr_, proton::receiver_options().credit_window(credit_).auto_accept(false),
		                    Auth());
		pn_link_set_rcv_settle_mode(LinkAccess::Get(r), PN_RCV_SECOND);
	}
	void on_message(proton::delivery &d, proton::message &) override {
		if (received_ == 0)
			start_ = Clock::now();
		d.accept();
		if (++received_ == count_) {
			end_ = Clock::now();
			d.connection().close();
		}
	}
	void on_error(const proton::error_condition &e) override {
		std::cerr << "error: " << e.what() << std::endl;
		failed_ = true;
	}
	double Seconds() const { return std::chrono::duration<double>(end_ - start_).count(); }
	long received() const { return received_; }
	bool failed() const { return failed_; }

  private:
	std::string url_, addr_;
	long count_, received_ = 0;
	int credit_;
	Clock::time_point start_, end_;
	bool failed_ = false;
};

} // namespace

int
main(int argc, char **argv) {
	if (argc < 5) {
		std::fprintf(stderr, "usage: %s send|recv|paced URL ADDRESS COUNT [BODY_BYTES|CREDIT|RATE]\n", argv[0]);
		return 2;
	}
	std::string mode = argv[1], url = argv[2], addr = argv[3];
	long count = std::atol(argv[4]);
	try {
		if (mode == "send") {
			Sender h(url, addr, count, argc > 5 ? static_cast<size_t>(std::atol(argv[5])) : 100);
			proton::container(h).run();
			if (h.failed() || h.confirmed() != count)
				return 1;
			std::printf("mode=send messages=%ld seconds=%.3f rate=%.0f\n", count, h.Seconds(), count / h.Seconds());
		} else if (mode == "paced") {
			if (argc < 6) {
				std::fprintf(stderr, "usage: %s paced URL ADDRESS COUNT RATE [FIRST_ID]\n", argv[0]);
				return 2;
			}
			PacedSender h(url, addr, count, std::atof(argv[5]), argc > 6 ? std::atol(argv[6]) : 5000000);
			proton::container(h).run();
			if (h.failed() || h.confirmed() != count)
				return 1;
			std::printf("mode=paced messages=%ld seconds=%.3f rate=%.0f\n", count, h.Seconds(), count / h.Seconds());
		} else {
			Receiver h(url, addr, count, argc > 5 ? std::atoi(argv[5]) : 1000);
			proton::container(h).run();
			if (h.failed() || h.received() != count)
				return 1;
			std::printf("mode=recv messages=%ld seconds=%.3f rate=%.0f\n", count, h.Seconds(), count / h.Seconds());
		}
	} catch (const std::exception &e) {
		std::fprintf(stderr, "%s\n", e.what());
		return 1;
	}
	return 0;
}
