"""/v1/models: the one served model, with its context length once it is loaded."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ember.server.openapi import ERROR_RESPONSES
from ember.server.protocol import ModelCard, ModelList
from ember.server.state import ServerState, server_state

router = APIRouter()


def _model_card(state: ServerState) -> ModelCard:
    engine = state.engine
    return ModelCard(id=state.served_model_name,
                     max_model_len=engine.max_model_len if engine.is_ready else None)


@router.get("/v1/models", responses=ERROR_RESPONSES)
async def list_models(raw: Request) -> ModelList:
    return ModelList(data=[_model_card(server_state(raw))])


@router.get("/v1/models/{model}", responses=ERROR_RESPONSES)
async def get_model(model: str, raw: Request) -> ModelCard:
    state = server_state(raw)
    state.check_model(model)
    return _model_card(state)
