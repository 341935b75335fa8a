// src/amqp/cbs.cpp
//   put-token on the $cbs node, on the AMQP thread. A SAS token is made here and renewed at half
//   its life on the same connection; an Entra ID token comes from the TokenSource (through
//   ConsumerConfig::current_token) and is put again whenever a new one is there, and the broker's
//   answer goes back to the TokenSource. Invariants: one put-token is outstanding at a time, and
//   one left unanswered for 60 s drops the connection; a refused renewal keeps the connection while
//   the token the broker last accepted holds; tokens are never logged.
#include "consumer_impl.hpp"

#include "sbpg/identity/sas.hpp"

#include <proton/message_id.hpp>
#include <proton/scalar.hpp>

#include <algorithm>

namespace sbpg::amqp {

std::string
CbsTokens::Open() {
	links_.Open(live_.conn, "$cbs", "cbs-", 10);
	if (cfg_.auth == ConsumerConfig::Auth::Sas) {
		PutSas();
		return "";
	}
	BearerToken t;
	if (!cfg_.current_token(&t))
		return "the token expired before it could be put";
	PutJwt(t);
	return "";
}

// A token worth connecting with: not refused, and with enough life left to be put and used
// (a quarter of its lifetime, at most 30 s); otherwise wait for the renewal.
bool
CbsTokens::TokenReady() const {
	BearerToken t;
	if (!cfg_.current_token || !cfg_.current_token(&t) || t.serial == refused_serial_)
		return false;
	int64_t margin = std::min<int64_t>(30000, (t.expires_ms - t.obtained_ms) / 4);
	return t.expires_ms - Now() >= margin;
}

std::string
CbsTokens::Work(int64_t now) {
	if (refresh_at_ && now >= refresh_at_ && cfg_.auth == ConsumerConfig::Auth::Sas) {
		refresh_at_ = 0;
		PutSas();
	}
	if (put_pending_ && now - put_sent_ms_ > 60000)
		return "no answer to put-token for " + cfg_.audience + " within 60 s";
	if (links_.HasSender() && !put_pending_ && cfg_.auth == ConsumerConfig::Auth::Jwt) {
		BearerToken t;
		if (cfg_.current_token(&t) && t.serial != put_serial_ && t.serial != refused_serial_)
			PutJwt(t);
	}
	return "";
}

void
CbsTokens::PutSas() {
	int64_t expiry = Now() / 1000 + cfg_.sas_token_lifetime_s;
	Put("servicebus.windows.net:sastoken", MakeSasToken(cfg_.audience, cfg_.sas_key_name, cfg_.sas_key, expiry),
	    expiry * 1000);
}

// An Entra ID token, put for the entity's audience as the Azure SDKs do.
void
CbsTokens::PutJwt(const BearerToken &t) {
	put_serial_ = t.serial;
	Put("jwt", t.jwt, t.expires_ms);
}

void
CbsTokens::Put(const std::string &type, const std::string &token, int64_t expires_ms) {
	proton::message m;
	m.id(proton::message_id(NewGuid()));
	m.to("$cbs");
	m.properties().put("operation", "put-token");
	m.properties().put("type", type);
	m.properties().put("name", cfg_.audience);
	m.body(token);
	put_expires_ms_ = expires_ms;
	put_pending_ = true;
	put_sent_ms_ = Now();
	links_.Send(std::move(m));
}

CbsTokens::Next
CbsTokens::OnReply(proton::message &m, std::string *why) {
	int64_t code = 0;
	std::string desc;
	try {
		proton::scalar s = m.properties().get("status-code");
		code = proton::coerce<int64_t>(s);
		if (m.properties().exists("status-description"))
			desc = proton::coerce<std::string>(m.properties().get("status-description"));
	} catch (const std::exception &e) {
		desc = std::string("unreadable put-token answer: ") + e.what();
	}
	put_pending_ = false;
	if (code >= 200 && code < 300)
		return Accepted();
	return Refused(code, desc, why);
}

CbsTokens::Next
CbsTokens::Accepted() {
	accepted_expires_ms_ = put_expires_ms_;
	{
		std::lock_guard<std::mutex> g(handoff_.mu);
		handoff_.status.token_expires_ms = put_expires_ms_;
		++handoff_.status.tokens_put;
	}
	if (cfg_.auth == ConsumerConfig::Auth::Jwt)
		cfg_.token_answer(put_serial_, true, "");
	else // Renew at half the token's life, on this connection.
		refresh_at_ = Now() + cfg_.sas_token_lifetime_s * 500;
	if (!live_.receiving)
		return Next::OpenReceiver;
	handoff_.Event(ConsumerEvent::Kind::TokenRenewed,
	               "token renewed for " + cfg_.audience + " until " + FormatTime(put_expires_ms_));
	return Next::Nothing;
}

CbsTokens::Next
CbsTokens::Refused(int64_t code, const std::string &desc, std::string *why) {
	*why = "put-token for " + cfg_.audience + " was refused (" + std::to_string(code) + " " + desc + ")";
	if (cfg_.auth == ConsumerConfig::Auth::Jwt) {
		refused_serial_ = put_serial_;
		cfg_.token_answer(put_serial_, false, std::to_string(code) + " " + desc);
		// A renewal refused while the accepted token still holds: keep the links (and their
		// locks) and put the next token when it comes.
		if (live_.receiving && accepted_expires_ms_ > Now()) {
			handoff_.Event(ConsumerEvent::Kind::TokenRefused,
			               *why + "; the accepted token holds until " + FormatTime(accepted_expires_ms_));
			return Next::Nothing;
		}
	}
	return Next::Drop;
}

void
CbsTokens::Reset() {
	links_.Reset();
	refresh_at_ = 0;
	put_pending_ = false;
	put_serial_ = 0;
	accepted_expires_ms_ = 0;
}

} // namespace sbpg::amqp
